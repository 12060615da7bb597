"""Calls with WIT types reflected at load give what wasmtime-py's own Func.__call__ gives, and host
functions registered with their types reflected at load do what wasmtime-py's Linker.add_func
does: the same values, the same rejections, the same errors, the same read-model writes and
published events, for real components and for every WIT type the converters handle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import pytest
import wasmtime
from wasmtime.component import Component, ErrorContext, Func, Linker, Record, Variant

from concordance_provider.build import build_component
from concordance_provider.links import Role
from concordance_provider.runtime.call_caps import CallBudget
from concordance_provider.runtime.component import HandlerEffects
from concordance_provider.runtime.wasmtime_host import WasmtimeComponent, _record
from concordance_provider.runtime import wasmtime_host, wit_calls
from concordance_provider.runtime.wit_calls import Unsupported, add_host_func, compile_call, converter, imported_funcs

ROOT = Path(__file__).resolve().parent.parent.parent
TEST_SOURCES = ROOT / "tests" / "components"
TEST_BUILD = TEST_SOURCES / "build"


# -- comparing the two paths ---------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """A value with its Python types spelled out, so that equal means the same shape too."""
    if isinstance(value, Record):
        return ("Record", {name: _plain(field) for name, field in vars(value).items()})
    if isinstance(value, Variant):
        return ("Variant", value.tag, _plain(value.payload))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_plain(item) for item in value])
    return (type(value).__name__, value)


def _outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("returned", _plain(call()))
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


READ_MODEL = {"balance.K1": json.dumps({"accountNumber": "K1", "customerId": "x", "balance": 100,
                                        "reserved": 0, "entries": 1})}


Read = Callable[[str], "str | None"]


def _effects(refuse_publish: bool = False, read: Read = READ_MODEL.get) -> HandlerEffects:
    return HandlerEffects(read=read, check_publish=lambda key, event: "refused" if refuse_publish else None)


def _host_call(component: WasmtimeComponent, export: str, args: tuple[Any, ...], plain: bool,
               refuse_publish: bool, read: Read) -> tuple[Any, ...]:
    """One WasmtimeComponent._call, through wasmtime-py's call (plain) or the compiled one."""
    if component._store is None:
        component._instantiate()
    compiled = component._calls[export]
    if plain:
        component._calls[export] = component._funcs[export]
    stateless = component.role in (Role.PROJECTOR, Role.NOTIFIER)
    effects = _effects(refuse_publish, read) if stateless else None
    component._effects, component._budget = effects, CallBudget(effects) if effects else None
    try:
        outcome = _outcome(lambda: component._call(export, *args))
    finally:
        component._calls[export] = compiled
        component._effects, component._budget = None, None
    return outcome + ((effects.puts, effects.published) if effects else ())


def _through_both(components: WasmtimeComponent | Sequence[WasmtimeComponent], export: str, *args: Any,
                  refuse_publish: bool = False, read: Read = READ_MODEL.get) -> tuple[Any, ...]:
    """The call through wasmtime-py's call and the compiled one, on each component given (the same
    file with each registration of the host functions): every outcome the same."""
    if isinstance(components, WasmtimeComponent):
        components = [components]
    outcomes = [_host_call(component, export, args, plain=plain, refuse_publish=refuse_publish, read=read)
                for component in components for plain in (True, False)]
    assert all(outcome == outcomes[0] for outcome in outcomes[1:])
    return outcomes[-1]


HOST_FUNCS = ("get", "put", "delete", "publish")


def _load(name: str, path: Path, role: Role, compiled_host: bool = True) -> WasmtimeComponent:
    """``path`` loaded, its host functions registered with their types reflected at load (compiled)
    or with wasmtime-py's add_func (what add_host_func falls back to without a type)."""
    component = WasmtimeComponent(name, path, role, call_timeout_ms=5000, max_memory_mb=128)
    registered: dict[str, bool] = {}

    def add(instance: Any, func_name: str, func: Any, func_type: Any) -> bool:
        registered[func_name] = add_host_func(instance, func_name, func, func_type if compiled_host else None)
        return registered[func_name]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wasmtime_host, "add_host_func", add)
        component._load()
    assert all(not isinstance(call, Func) for call in component._calls.values()), "fell back"
    stateless = role in (Role.PROJECTOR, Role.NOTIFIER)  # only they import the host functions
    assert registered == dict.fromkeys(HOST_FUNCS, compiled_host and stateless)
    return component


class Hosts(NamedTuple):
    """One component file loaded twice, with each registration of the host functions."""

    plain: WasmtimeComponent  # Linker.add_func
    compiled: WasmtimeComponent  # add_host_func


def _load_both(name: str, path: Path, role: Role) -> Hosts:
    return Hosts(_load(name, path, role, compiled_host=False), _load(name, path, role))


def _event(event_type: str, stream: str, payload: dict[str, Any]) -> Any:
    return _record(event_type=event_type, stream=stream, payload=json.dumps(payload))


def _command(command_type: str, state: str | None, payload: Any) -> Any:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return _record(aggregate="bankaccount", command_type=command_type, key="K1", state=state, payload=text)


# -- the bank example ------------------------------------------------------------------------------

CREATE = {"accountNumber": "K1", "initialBalance": 100, "minBalance": 0, "customerId": "x"}
DEPOSIT = {"accountNumber": "K1", "amount": 5, "customerId": "x", "note": "n"}
WIRE = {"accountNumber": "K1", "amount": 50, "customerId": "x", "wireTransferId": "W1",
        "targetRoutingNumber": "123456789", "targetAccountNumber": "Z9", "note": ""}


def test_the_aggregate_decides_folds_and_rejects_the_same(example_components):
    aggregate = _load("agg", example_components["bankaccount_aggregate"], Role.AGGREGATE)
    created = _through_both(aggregate, "handle-command", _command("create_account", None, CREATE))
    [event] = created[1][1]
    assert event[1]["event-type"] == ("str", "account_created")
    fields = {name: value for name, (_, value) in event[1].items()}
    folded = _through_both(aggregate, "apply-event", _record(
        event=_record(event_type=fields["event-type"], stream=fields["stream"], payload=fields["payload"]),
        state=None))
    state = folded[1][1]["state"][1]
    assert json.loads(state)["balance"] == 100
    _through_both(aggregate, "handle-command", _command("deposit_funds", state, {**DEPOSIT, "note": "é ✓ 🙂"}))
    _through_both(aggregate, "apply-event", _record(event=_event("funds_deposited", "bankaccount", DEPOSIT),
                                                    state=state))
    missing = _through_both(aggregate, "handle-command", _command("deposit_funds", None, DEPOSIT))
    assert missing == ("raised", "RejectedByComponent", "account does not exist")
    assert _through_both(aggregate, "handle-command", _command("deposit_funds", state, ""))[:2] == (
        "raised", "RejectedByComponent")
    refused = _through_both(aggregate, "apply-event", _record(event=_event("funds_deposited", "bankaccount", DEPOSIT),
                                                              state=None))
    assert refused[:2] == ("raised", "RejectedByComponent")


def test_the_process_manager_answers_commands_and_an_absent_state_the_same(example_components):
    manager = _load("pm", example_components["wiretransfer_process_manager"], Role.PROCESS_MANAGER)
    started = _through_both(manager, "handle-event", _record(
        event=_event("wire_transfer_initiated", "bankaccount", WIRE), state=None))
    ack = started[1][1]
    assert [command[1]["command-type"] for command in ack["commands"][1]] == [("str", "reserve_funds")]
    ended = _through_both(manager, "handle-event", _record(
        event=_event("funds_committed", "bankaccount", WIRE), state=ack["state"][1]))
    assert ended[1][1] == {"state": ("NoneType", None), "commands": ("list", [])}


RESERVE = {"accountNumber": "K1", "amount": 7, "customerId": "x", "wireTransferId": "W1"}


def test_the_projector_reads_writes_deletes_and_rejects_the_same(example_components):
    projector = _load_both("proj", example_components["bankaccount_projector"], Role.PROJECTOR)
    deposited = _through_both(projector, "apply-stateless-event", _event("funds_deposited", "bankaccount", DEPOSIT))
    assert deposited[:2] == ("returned", ("NoneType", None)) and "balance.K1" in deposited[2]
    assert json.loads(deposited[2]["balance.K1"])["balance"] == 105  # what get gave the component, plus 5
    _through_both(projector, "apply-stateless-event", _event("account_created", "bankaccount", CREATE))
    reserved = _through_both(projector, "apply-stateless-event", _event("funds_reserved", "bankaccount", RESERVE))
    assert reserved[2]["reservation.W1"] == "7"
    read_model = {**READ_MODEL, "reservation.W1": "7"}
    committed = _through_both(projector, "apply-stateless-event", _event("funds_committed", "bankaccount", RESERVE),
                              read=read_model.get)
    assert committed[2]["reservation.W1"] is None  # deleted
    assert json.loads(committed[2]["balance.K1"])["balance"] == 93
    unknown = _through_both(projector, "apply-stateless-event",
                            _event("funds_deposited", "bankaccount", {**DEPOSIT, "accountNumber": "K2"}))
    assert unknown[:3] == ("raised", "RejectedByComponent", "funds_deposited for unknown account K2")


def _call_with(component: WasmtimeComponent, event: Any, effects: HandlerEffects) -> Any:
    if component._store is None:
        component._instantiate()
    component._effects, component._budget = effects, CallBudget(effects)
    try:
        return component._call("apply-stateless-event", event)
    finally:
        component._effects, component._budget = None, None


class Away(Exception):
    """Not the component's fault, e.g. NATS out of reach."""


def test_a_host_functions_exceptions_reach_the_caller_the_same(example_components):
    projector = _load_both("proj", example_components["bankaccount_projector"], Role.PROJECTOR)
    deposit = _event("funds_deposited", "bankaccount", DEPOSIT)

    def bad_key(key: str) -> str | None:
        raise ValueError(f"no key like {key}")

    failed = _through_both(projector, "apply-stateless-event", deposit, read=bad_key)
    assert failed == ("raised", "ComponentFailed",
                      "component 'proj' failed in apply-stateless-event: no key like balance.K1", {}, [])
    for component in projector:  # any other exception is raised as it was raised, the same object
        away = Away("NATS is out of reach")

        def unreachable(key: str) -> str | None:
            raise away

        with pytest.raises(Away) as raised:
            _call_with(component, deposit, _effects(read=unreachable))
        assert raised.value is away and component._store is None  # stuck mid-call: thrown away
    after = _through_both(projector, "apply-stateless-event", deposit)
    assert after[:2] == ("returned", ("NoneType", None))


def test_a_value_from_a_host_function_without_a_result_fails_the_call_the_same(example_components):
    # put has no result: wasmtime-py asserts the host function gave None, and so does add_host_func
    for component in _load_both("proj", example_components["bankaccount_projector"], Role.PROJECTOR):
        component._put = lambda key, value: "unexpected"  # type: ignore[method-assign]
        with pytest.raises(AssertionError):
            _call_with(component, _event("funds_deposited", "bankaccount", DEPOSIT), _effects())


def test_the_gateway_publishes_the_same(example_components):
    gateway = _load_both("gw", example_components["otherbank_gateway"], Role.NOTIFIER)
    answered = _through_both(gateway, "apply-stateless-event", _event("wire_transfer_initiated", "bankaccount", WIRE))
    assert [event.event_type for _, event in answered[3]] == ["wire_transfer_succeeded"]
    refused = _through_both(gateway, "apply-stateless-event",
                            _event("wire_transfer_initiated", "bankaccount", WIRE), refuse_publish=True)
    assert refused[:3] == ("raised", "RejectedByComponent", "refused")
    _through_both(gateway, "apply-stateless-event", _event("funds_deposited", "bankaccount", DEPOSIT))


# -- the test components ---------------------------------------------------------------------------

def test_the_looper_counts_rejects_and_traps_the_same(looper_component):
    looper = _load("looper", looper_component, Role.AGGREGATE)
    assert _through_both(looper, "handle-command", _command("count", None, {}))[0] == "returned"
    assert _through_both(looper, "handle-command", _command("nope", None, {})) == (
        "raised", "RejectedByComponent", "unknown command nope")
    trapped = _through_both(looper, "handle-command", _command("crash", None, {}))
    assert trapped[:2] == ("raised", "ComponentFailed")
    assert looper._store is None  # poisoned, as before; the next call gets a fresh instance
    _through_both(looper, "apply-event", _record(event=_event("counted", "looper", {}), state='{"count": 2}'))
    assert _through_both(looper, "apply-event", _record(event=_event("unfoldable", "looper", {}), state=None)) == (
        "raised", "RejectedByComponent", "this event cannot be folded")


@pytest.fixture(scope="module")
def test_components() -> dict[str, Path]:
    built = {}
    for name in ("hoarder", "publisher", "writer"):
        built[name] = TEST_BUILD / f"{name}.wasm"
        build_component(TEST_SOURCES / name, "stateless-handler", built[name])
    return built


def test_the_hoarder_writer_and_publisher_have_the_same_effects(test_components):
    hoarder = _load_both("hoarder", test_components["hoarder"], Role.NOTIFIER)
    asked = {"puts": 2, "size": 3, "publish": 2, "publish_size": 4}
    hoarded = _through_both(hoarder, "apply-stateless-event", _event("hoard_asked", "hoard", asked))
    assert list(hoarded[2]) == ["hoard.0", "hoard.1"] and len(hoarded[3]) == 2
    # a host function refuses what is over its cap (OverCap, a ValueError): the call fails with its message
    too_big = {"puts": 1, "size": 2 ** 20 + 1}
    over = _through_both(hoarder, "apply-stateless-event", _event("hoard_asked", "hoard", too_big))
    assert over[:2] == ("raised", "ComponentFailed") and "over the cap of 1048576 bytes per value" in over[2]
    too_many = {"publish": 101, "publish_size": 1}
    over = _through_both(hoarder, "apply-stateless-event", _event("hoard_asked", "hoard", too_many))
    assert over[:2] == ("raised", "ComponentFailed") and "over the cap of 100 events published per call" in over[2]
    assert len(over[4]) == 100  # those within the cap were kept until the call failed

    writer = _load_both("writer", test_components["writer"], Role.PROJECTOR)
    written = _through_both(writer, "apply-stateless-event", _event("w", "s", {"keys": ["a", "b"]}))
    assert list(written[2]) == ["a", "b"]

    publisher = _load_both("publisher", test_components["publisher"], Role.NOTIFIER)
    forged = _through_both(publisher, "apply-stateless-event", _event("e", "s", {"accountNumber": "K1"}),
                           refuse_publish=True)
    assert forged[:3] == ("raised", "RejectedByComponent", "refused")


# -- every WIT type the converters handle ---------------------------------------------------------

NAMED_TYPES = """
  (type $e0 (enum "red" "green"))
  (import "e" (type $e (eq $e0)))
  (type $f0 (flags "p" "q"))
  (import "f" (type $f (eq $f0)))
  (type $r0 (record (field "a-b" u32) (field "c" (list (tuple string (option u8))))))
  (import "r" (type $r (eq $r0)))
  (type $v0 (variant (case "x" u32) (case "y" string) (case "z")))
  (import "v" (type $v (eq $v0)))
  (type $tv0 (variant (case "a" u32) (case "b" u32)))
  (import "tv" (type $tv (eq $tv0)))
"""
MEMORY = """
  (core module $mem
    (memory (export "memory") 4)
    (global $bump (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $r i32)
      (local.set $r (i32.and (i32.add (global.get $bump) (i32.sub (local.get 2) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get 2))))
      (global.set $bump (i32.add (local.get $r) (local.get 3)))
      (local.get $r)))
  (core instance $m (instantiate $mem))
"""
OPTIONS = '(memory (core memory $m "memory")) (realloc (core func $m "realloc"))'

RECORD = Record()
RECORD.__dict__.update({"a-b": 3, "c": [("s", None), ("", 7), ("é🙂", 255)]})
SHORT_RECORD = Record()
SHORT_RECORD.__dict__.update({"a-b": 3})
BAD_RECORD = Record()
BAD_RECORD.__dict__.update({"a-b": 3, "c": [("s", None), (5, None), ("t", 1)]})

# export: (WIT type, its flat parameter count if its result goes through memory, values to echo)
ECHOES: dict[str, tuple[str, int | None, list[Any]]] = {
    "string": ("string", 2, ["", "plain", "é ✓ 🙂", 5, None, "\ud800"]),
    "opt-string": ("(option string)", 3, [None, "", "x", 5, b"x"]),
    "opt-opt": ("(option (option string))", 4, [None, Variant("none"), Variant("some", None),
                                               Variant("some", "x"), "x"]),
    "res-unit": ("(result (error string))", 3, [None, "why", 5]),
    "res-tagged": ("(result u32 (error u32))", 2, [Variant("ok", 1), Variant("err", 2), Variant("nope", 3), 1]),
    "tuple": ("(tuple u32 string bool)", 4, [(5, "x", True), (5, "x"), [5, "x", True], (5, 6, True)]),
    "record": ("$r", 3, [RECORD, SHORT_RECORD, BAD_RECORD, None]),
    "records": ("(list $r)", 2, [[], [RECORD, RECORD], [RECORD, BAD_RECORD], (RECORD,)]),
    "variant": ("$v", 3, [7, "y", None, Variant("y", "y"), 1.5]),
    "tagged-variant": ("$tv", 2, [Variant("a", 1), Variant("b", 2), 1]),
    "bytes": ("(list u8)", 2, [b"", b"\x00\xffab", bytearray(b"x"), [1, 2]]),
    "enum": ("$e", None, ["green", "blue", 1]),
    "flags": ("$f", None, [set(), {"q"}, {"p", "q"}, ["p"]]),
    "bool": ("bool", None, [True, False, 1]),
    "char": ("char", None, ["é", "ab", 1]),
    "s8": ("s8", None, [-5, 5, "5"]),
    "u64": ("u64", None, [2 ** 64 - 1, 0, 1.0]),
    "f32": ("f32", None, [1.5, 1]),
    "f64": ("f64", None, [-2.25, None]),
}


def _echo_wat() -> str:
    """A component whose export NAME returns what its import echo-NAME (the host) returns, the
    host echoing its argument: each value is lowered and lifted twice, through both directions."""
    parts = ["(component", NAMED_TYPES, MEMORY]
    for name, (ty, flat, _) in ECHOES.items():
        parts.append(f'(type $t-{name} (func (param "x" {ty}) (result {ty})))')
        parts.append(f'(import "echo-{name}" (func $echo-{name} (type $t-{name})))')
        parts.append(f"(core func $low-{name} (canon lower (func $echo-{name}) {OPTIONS}))")
        core = f"(core func $low-{name})"
        if flat is not None:  # the result comes back in memory: hand the import a place for it
            params = " ".join(["i32"] * flat)
            args = " ".join(f"(local.get {index})" for index in range(flat))
            parts.append(f"""(core module $wrap-{name}
  (import "" "f" (func $f (param {params} i32)))
  (func (export "g") (param {params}) (result i32) (call $f {args} (i32.const 64)) (i32.const 64)))
(core instance $w-{name} (instantiate $wrap-{name} (with "" (instance (export "f" (func $low-{name}))))))""")
            core = f'(core func $w-{name} "g")'
        parts.append(f"(func $lift-{name} (type $t-{name}) (canon lift {core} {OPTIONS}))")
        parts.append(f'(export "{name}" (func $lift-{name}))')
    return "\n".join(parts + [")"])


Instantiate = Callable[[], tuple[wasmtime.Store, Any]]


@pytest.fixture(scope="module")
def echo_component() -> tuple[wasmtime.Engine, Component]:
    engine = wasmtime.Engine()
    return engine, Component(engine, _echo_wat())


def _echo_instances(engine: wasmtime.Engine, component: Component, compiled_host: bool,
                    answers: dict[str, Any]) -> Instantiate:
    """Fresh instances (an error inside wasmtime leaves an instance that cannot be entered again)
    whose host echo-NAME answers ``answers[NAME]`` if there is one, or else its argument; registered
    with add_host_func and the imports' types (compiled) or with add_func."""
    types = imported_funcs(component, engine) if compiled_host else {}
    linker = Linker(engine)
    with linker.root() as root:
        for name in ECHOES:
            def answer(_store: Any, value: Any, name: str = name) -> Any:
                return answers.get(name, value)

            assert add_host_func(root, f"echo-{name}", answer, types.get(f"echo-{name}")) == compiled_host

    def instantiate() -> tuple[wasmtime.Store, Any]:
        store = wasmtime.Store(engine)
        return store, linker.instantiate(store, component)

    return instantiate


@pytest.fixture(scope="module")
def echo(echo_component) -> Instantiate:
    return _echo_instances(*echo_component, compiled_host=False, answers={})


class EchoHosts(NamedTuple):
    plain: Instantiate  # add_func
    compiled: Instantiate  # add_host_func
    answers: dict[str, Any]  # what the hosts answer instead of echoing


@pytest.fixture
def echo_hosts(echo_component) -> EchoHosts:
    answers: dict[str, Any] = {}
    return EchoHosts(_echo_instances(*echo_component, False, answers),
                     _echo_instances(*echo_component, True, answers), answers)


def _echoed(echo: Instantiate, name: str, compiled: bool, *args: Any) -> tuple[Any, ...]:
    store, instance = echo()
    func = instance.get_func(store, name)
    call = compile_call(func, store) if compiled else func
    assert isinstance(call, Func) != compiled

    def run() -> Any:
        result = call(store, *args)
        func.post_return(store)
        return result

    return _outcome(run)


@pytest.mark.parametrize("name", list(ECHOES))
def test_every_handled_type_lowers_and_lifts_as_wasmtime_py_does(echo, name):
    for value in ECHOES[name][2]:
        plain = _echoed(echo, name, False, value)
        assert _echoed(echo, name, True, value) == plain, value
        if plain[0] == "returned" and not isinstance(value, bytearray):
            assert plain[1] == _plain(value)  # the echo is faithful, so both paths carry it whole
    for args in [(), (ECHOES[name][2][0],) * 2]:
        assert _echoed(echo, name, True, *args) == _echoed(echo, name, False, *args)


def _through_both_hosts(hosts: EchoHosts, name: str, *args: Any) -> tuple[Any, ...]:
    """The call through the add_func host and wasmtime-py's call, then through the compiled host
    and each call: every outcome the same."""
    plain = _echoed(hosts.plain, name, False, *args)
    for compiled_call in (False, True):
        assert _echoed(hosts.compiled, name, compiled_call, *args) == plain, args
    return plain


@pytest.mark.parametrize("name", list(ECHOES))
def test_every_handled_type_reaches_a_host_function_and_comes_back_as_through_add_func(echo_hosts, name):
    values = ECHOES[name][2]
    for value in values:  # lifted for the host (a bad one fails before, in the export's lowering)
        _through_both_hosts(echo_hosts, name, value)
    for value in values:  # lowered from the host's answer: a bad one fails in the host function
        echo_hosts.answers[name] = value
        answered = _through_both_hosts(echo_hosts, name, values[0])
        if answered[0] == "returned" and not isinstance(value, bytearray):
            assert answered[1] == _plain(value)


def test_an_error_lowering_a_host_functions_answer_is_raised_to_the_caller(echo_hosts):
    echo_hosts.answers["string"] = 5
    assert _through_both_hosts(echo_hosts, "string", "x") == ("raised", "TypeError", "expected string type")


def test_a_host_function_is_called_with_as_many_arguments_as_its_type_has(echo_component):
    engine, component = echo_component
    run = wit_calls._trampoline(lambda _store, value: value, imported_funcs(component, engine)["echo-string"])
    with pytest.raises(AssertionError, match="given 2 arguments and 1 result slots; its type has 1 and 1"):
        run(wasmtime.Store(engine), None, 2, None, 1)


def test_a_type_without_converters_keeps_wasmtime_pys_call_and_add_func(echo, echo_component, monkeypatch):
    with pytest.raises(Unsupported):
        converter(ErrorContext())
    store, instance = echo()
    func = instance.get_func(store, "record")

    def unsupported(ty: Any) -> Any:
        raise Unsupported("as if")

    monkeypatch.setattr(wit_calls, "converter", unsupported)
    assert compile_call(func, store) is func
    engine, component = echo_component
    types = imported_funcs(component, engine)
    linker = Linker(engine)
    with linker.root() as root:
        for name in ECHOES:
            assert not add_host_func(root, f"echo-{name}", lambda _store, value: value, types[f"echo-{name}"])
    monkeypatch.undo()
    store = wasmtime.Store(engine)
    func = linker.instantiate(store, component).get_func(store, "record")
    assert _plain(func(store, RECORD)) == _plain(RECORD)


def test_the_types_are_those_of_the_functions_the_component_imports(example_components):
    projector = _load("proj", example_components["bankaccount_projector"], Role.PROJECTOR)
    component, engine = projector._component, projector._shared.engine
    read_model = imported_funcs(component, engine, "concordance:eventsourcing/read-model@0.1.0")
    assert {name: len(ty.params) for name, ty in read_model.items()} == {"get": 1, "put": 2, "delete": 1}
    assert imported_funcs(component, engine, "concordance:eventsourcing/nothing@0.1.0") == {}

