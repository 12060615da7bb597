"""Calls with WIT types reflected at load give what wasmtime-py's own Func.__call__ gives: the
same values, the same rejections, the same errors, for real components and for every WIT type
the converters handle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import wasmtime
from wasmtime.component import Component, ErrorContext, Func, Linker, Record, Variant

from concordance_provider.build import build_component
from concordance_provider.links import Role
from concordance_provider.runtime.call_caps import CallBudget
from concordance_provider.runtime.component import HandlerEffects
from concordance_provider.runtime.wasmtime_host import WasmtimeComponent, _record
from concordance_provider.runtime import wit_calls
from concordance_provider.runtime.wit_calls import Unsupported, compile_call, converter

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


def _effects(refuse_publish: bool = False) -> HandlerEffects:
    return HandlerEffects(read=READ_MODEL.get,
                          check_publish=lambda key, event: "refused" if refuse_publish else None)


def _host_call(component: WasmtimeComponent, export: str, args: tuple[Any, ...], plain: bool,
               refuse_publish: bool) -> tuple[Any, ...]:
    """One WasmtimeComponent._call, through wasmtime-py's call (plain) or the compiled one."""
    if component._store is None:
        component._instantiate()
    compiled = component._calls[export]
    if plain:
        component._calls[export] = component._funcs[export]
    stateless = component.role in (Role.PROJECTOR, Role.NOTIFIER)
    effects = _effects(refuse_publish) if stateless else None
    component._effects, component._budget = effects, CallBudget(effects) if effects else None
    try:
        outcome = _outcome(lambda: component._call(export, *args))
    finally:
        component._calls[export] = compiled
        component._effects, component._budget = None, None
    return outcome + ((effects.puts, effects.published) if effects else ())


def _through_both(component: WasmtimeComponent, export: str, *args: Any,
                  refuse_publish: bool = False) -> tuple[Any, ...]:
    plain = _host_call(component, export, args, plain=True, refuse_publish=refuse_publish)
    compiled = _host_call(component, export, args, plain=False, refuse_publish=refuse_publish)
    assert compiled == plain
    return compiled


def _load(name: str, path: Path, role: Role) -> WasmtimeComponent:
    component = WasmtimeComponent(name, path, role, call_timeout_ms=5000, max_memory_mb=128)
    component._load()
    assert all(not isinstance(call, Func) for call in component._calls.values()), "fell back"
    return component


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


def test_the_projector_writes_and_rejects_the_same(example_components):
    projector = _load("proj", example_components["bankaccount_projector"], Role.PROJECTOR)
    deposited = _through_both(projector, "apply-stateless-event", _event("funds_deposited", "bankaccount", DEPOSIT))
    assert deposited[:2] == ("returned", ("NoneType", None)) and "balance.K1" in deposited[2]
    _through_both(projector, "apply-stateless-event", _event("account_created", "bankaccount", CREATE))
    unknown = _through_both(projector, "apply-stateless-event",
                            _event("funds_deposited", "bankaccount", {**DEPOSIT, "accountNumber": "K2"}))
    assert unknown[:3] == ("raised", "RejectedByComponent", "funds_deposited for unknown account K2")


def test_the_gateway_publishes_the_same(example_components):
    gateway = _load("gw", example_components["otherbank_gateway"], Role.NOTIFIER)
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
    hoarder = _load("hoarder", test_components["hoarder"], Role.NOTIFIER)
    asked = {"puts": 2, "size": 3, "publish": 2, "publish_size": 4}
    hoarded = _through_both(hoarder, "apply-stateless-event", _event("hoard_asked", "hoard", asked))
    assert list(hoarded[2]) == ["hoard.0", "hoard.1"] and len(hoarded[3]) == 2
    too_big = {"puts": 1, "size": 2 ** 20 + 1}
    over = _through_both(hoarder, "apply-stateless-event", _event("hoard_asked", "hoard", too_big))
    assert over[:2] == ("raised", "ComponentFailed")  # a host function refused the call

    writer = _load("writer", test_components["writer"], Role.PROJECTOR)
    written = _through_both(writer, "apply-stateless-event", _event("w", "s", {"keys": ["a", "b"]}))
    assert list(written[2]) == ["a", "b"]

    publisher = _load("publisher", test_components["publisher"], Role.NOTIFIER)
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


@pytest.fixture(scope="module")
def echo() -> Callable[[], tuple[wasmtime.Store, Any]]:
    """Fresh instances: an error inside wasmtime leaves an instance that cannot be entered again."""
    engine = wasmtime.Engine()
    linker = Linker(engine)
    with linker.root() as root:
        for name in ECHOES:
            root.add_func(f"echo-{name}", lambda _store, value: value)
    component = Component(engine, _echo_wat())

    def instantiate() -> tuple[wasmtime.Store, Any]:
        store = wasmtime.Store(engine)
        return store, linker.instantiate(store, component)

    return instantiate


def _echoed(echo: Callable[[], tuple[wasmtime.Store, Any]], name: str, compiled: bool, *args: Any) -> tuple[Any, ...]:
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


def test_a_type_without_converters_keeps_wasmtime_pys_call(echo, monkeypatch):
    with pytest.raises(Unsupported):
        converter(ErrorContext())
    store, instance = echo()
    func = instance.get_func(store, "record")

    def unsupported(ty: Any) -> Any:
        raise Unsupported("as if")

    monkeypatch.setattr(wit_calls, "converter", unsupported)
    assert compile_call(func, store) is func

