"""Property-based checks of the two parsers at the edge: RawCommands and link values.

Each strategy generates valid inputs, with the values they must parse to, and invalid ones, each
with exactly one defect and the error it must get. A separate test counts how many generated
inputs the parser really accepts, so the properties cannot pass on invalid input alone.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from concordance_provider.links import DEFAULT_BATCH, LINK_BOUNDS, LinkError, ProcessLifetime, Role, parse_interest
from concordance_provider.naming import (
    aggregate_state_key,
    check_token,
    event_subject,
    parse_event_subject,
    snake_case,
)
from concordance_provider.wire import BadMessage, parse_command

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# derandomized: the shares below are a property of the strategies, not of one run
COUNTED = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow])

# -- building blocks ---------------------------------------------------------------------------

tokens = st.from_regex(r"[A-Za-z0-9_\-=]{1,128}", fullmatch=True)
# what a client may write as a type: CamelCase, kebab-case, spaced words; snake_case makes a token
type_words = st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,10}", fullmatch=True)
raw_types = st.builds(
    lambda words, separator, pad: pad + separator.join(words) + pad,
    st.lists(type_words, min_size=1, max_size=4), st.sampled_from(["_", "-", " ", ""]), st.sampled_from(["", " "]),
)
# a character no subject token may hold, that neither trimming nor snake_case removes
unsafe_chars = st.sampled_from([".", "*", ">", "/", "ü", "$", ":", "\x00"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
payloads = st.dictionaries(st.text(max_size=10), json_values, max_size=4)


@st.composite
def unsafe_tokens(draw: st.DrawFn) -> str:
    """A value that is never one safe token, even after trimming."""
    kind = draw(st.sampled_from(["char", "too long"]))
    if kind == "too long":
        return draw(st.from_regex(r"[a-z0-9]{129,140}", fullmatch=True))
    return draw(st.from_regex(r"[a-z0-9]{1,5}", fullmatch=True)) + draw(unsafe_chars) + draw(
        st.from_regex(r"[a-z0-9]{0,5}", fullmatch=True))


@dataclass(frozen=True)
class Case:
    """One generated input and what the parser must make of it: ``expected`` (valid) or the exact
    ``error`` (invalid, one defect)."""

    kind: str
    body: Any
    expected: Any = None
    error: str | None = None


# -- RawCommands -------------------------------------------------------------------------------


@st.composite
def valid_commands(draw: st.DrawFn) -> Case:
    raw_type, key, data = draw(raw_types), draw(tokens), draw(payloads)
    doc = {"command_type": raw_type, "key": key, "data": data}
    if draw(st.booleans()):
        doc["extra"] = draw(json_values)  # unknown fields are ignored
    return Case("valid", doc, expected=(snake_case(raw_type), key, data))


@st.composite
def invalid_commands(draw: st.DrawFn) -> Case:
    base: dict[str, Any] = dict(draw(valid_commands()).body)
    defect = draw(st.sampled_from(["missing", "mistyped", "unsafe key", "unsafe command_type", "not an object"]))
    if defect == "missing":
        field = draw(st.sampled_from(["command_type", "key", "data"]))
        del base[field]
        return Case(defect, base, error=f"malformed command: {field}: Field required")
    if defect == "mistyped":
        field = draw(st.sampled_from(["command_type", "key", "data"]))
        if field == "data":
            base[field] = draw(st.none() | st.booleans() | st.integers() | st.text(max_size=5)
                               | st.lists(json_values, max_size=2))
            return Case(defect, base, error="malformed command: data: Input should be an object")
        base[field] = draw(st.none() | st.booleans() | st.integers() | st.lists(st.text(max_size=3), max_size=2)
                           | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
        return Case(defect, base, error=f"malformed command: {field}: Input should be a valid string")
    if defect == "unsafe key":
        base["key"] = draw(unsafe_tokens() | st.sampled_from(["", " ", "abc\n", "a.>", "*", ">"]))
        return Case(defect, base, error=f"malformed command: key: Value error, key {base['key']!r} is not allowed: "
                                        "use 1-128 characters from A-Z a-z 0-9 _ - =")
    if defect == "unsafe command_type":
        raw = draw(unsafe_tokens() | st.sampled_from(["", "  ", "a.b", "*"]))
        base["command_type"] = raw
        return Case(defect, base, error=f"malformed command: command_type: Value error, command_type "
                                        f"{snake_case(raw)!r} is not allowed: use 1-128 characters from A-Z a-z 0-9 _ - =")
    body = draw(st.lists(json_values, max_size=3) | st.text(max_size=5) | st.integers() | st.none())
    return Case(defect, body, error="malformed command: body: Input should be an object")


commands = st.one_of(valid_commands(), invalid_commands())


def _check_command(case: Case) -> str:
    """Parse one generated command and check the outcome; return whether it was accepted."""
    try:
        command = parse_command(json.dumps(case.body).encode())
    except BadMessage as exc:
        assert case.kind != "valid", f"valid command {case.body!r} refused: {exc}"
        assert str(exc) == case.error
        return "refused"
    assert case.kind == "valid", f"{case.kind} command {case.body!r} accepted as {command!r}"
    command_type, key, data = case.expected
    assert (command.command_type, command.key, command.data) == (command_type, key, data)
    # what is accepted can never reach outside its own subject and state key
    assert check_token(command.command_type, "command_type") == command.command_type
    assert parse_event_subject(event_subject(command.command_type, "agg", command.key)) == (
        command.command_type, "agg", command.key)
    assert aggregate_state_key("agg", command.key).split(".") == ["agg", "agg", command.key]
    return "accepted"


@PROPERTY
@given(commands)
def test_generated_commands_parse_to_their_values_or_get_their_error(case):
    event(f"{case.kind}: {_check_command(case)}")


@pytest.mark.parametrize("raw, expected", [("DepositFunds", "deposit_funds"), ("withdraw-funds", "withdraw_funds"),
                                           (" Create Account ", "create_account"), ("wire_funds", "wire_funds")])
def test_command_type_normalisation_examples(raw, expected):
    assert _check_command(Case("valid", {"command_type": raw, "key": "K1", "data": {}},
                               expected=(expected, "K1", {}))) == "accepted"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_command_parsing(body):
    try:
        parse_command(body)
    except BadMessage as exc:
        assert str(exc).startswith("malformed command: ")


def _outcomes(strategy: st.SearchStrategy[Case], check: Callable[[Case], str]) -> Counter[str]:
    seen: Counter[str] = Counter()

    @COUNTED
    @given(strategy)
    def run(generated: Case) -> None:
        seen[check(generated)] += 1

    run()
    return seen


def test_a_real_share_of_generated_commands_parse():
    seen = _outcomes(commands, _check_command)
    total = sum(seen.values())
    assert total >= 100
    assert seen["accepted"] >= total * 0.1 and seen["refused"] >= total * 0.1, seen


# -- link values -------------------------------------------------------------------------------

ROLE_SPELLINGS = {
    Role.AGGREGATE: ["aggregate", "Aggregate", "AGGREGATE"],
    Role.PROJECTOR: ["projector", "Projector"],
    Role.NOTIFIER: ["notifier", "Notifier"],
    Role.PROCESS_MANAGER: ["process_manager", "ProcessManager", "process-manager", "Process Manager"],
}


@st.composite
def link_key(draw: st.DrawFn, name: str) -> str:
    """A key as a user may spell it: any case, spaces around (keys are case-insensitive, trimmed)."""
    cased = "".join(c.lower() if draw(st.booleans()) else c for c in name)
    return draw(st.sampled_from(["", " "])) + cased + draw(st.sampled_from(["", " "]))


@st.composite
def valid_links(draw: st.DrawFn) -> Case:
    role = draw(st.sampled_from(list(Role)))
    name = draw(tokens)
    expected: dict[str, Any] = {"role": role, "name": name, "stream": None, "event_types": (), "lifetime": None,
                                "key_field": None, "max_messages_per_batch": DEFAULT_BATCH}
    if role is Role.AGGREGATE:
        interest: Any = draw(tokens)
        expected["stream"] = interest
    elif role is Role.PROCESS_MANAGER:
        start, advance, stop = draw(raw_types), draw(st.lists(raw_types, max_size=3)), draw(st.lists(raw_types, max_size=3))
        interest = json.dumps({"start": start, "advance": advance, "stop": stop})
        expected["lifetime"] = ProcessLifetime(start=snake_case(start), advance=tuple(map(snake_case, advance)),
                                               stop=tuple(map(snake_case, stop)))
    else:
        types = draw(st.lists(raw_types, min_size=1, max_size=4))
        interest = draw(st.sampled_from([",", ", ", " , "])).join(types)
        expected["event_types"] = tuple(snake_case(t) for t in types)
    values = {"ROLE": draw(st.sampled_from(ROLE_SPELLINGS[role])), "NAME": name, "INTEREST": interest}
    if role is Role.PROCESS_MANAGER or draw(st.booleans()):
        values["KEY"] = expected["key_field"] = draw(st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,20}", fullmatch=True))
    batch = draw(st.none() | st.integers(1, LINK_BOUNDS["MAX_MESSAGES_PER_BATCH"].high)
                 | st.sampled_from(["abc", "-1", "0", ""]))
    if batch is not None:  # the original contract: an unparsable batch size falls back to the default
        values["MAX_MESSAGES_PER_BATCH"] = str(batch)
        expected["max_messages_per_batch"] = batch if isinstance(batch, int) else DEFAULT_BATCH
    for name_ in ("CALL_TIMEOUT_MS", "MAX_DELIVERIES"):
        number = draw(st.none() | st.integers(LINK_BOUNDS[name_].low, LINK_BOUNDS[name_].high))
        if number is not None:
            values[name_] = str(number)
            expected[name_.lower()] = number
    if draw(st.integers(0, 4)) == 0:  # the same declaration, as CONFIG_B64
        doc = {"role": values["ROLE"], "name": name, "interest": interest}
        if "KEY" in values:
            doc["key_field"] = values["KEY"]
        encoded = base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")
        values = {k: v for k, v in values.items() if k not in ("ROLE", "NAME", "INTEREST", "KEY")}
        values["CONFIG_B64"] = encoded
    spelled = {draw(link_key(k)): v for k, v in values.items()}
    return Case("valid", spelled, expected=expected)


def _plain_link(role: Role, interest: str) -> dict[str, str]:
    values = {"ROLE": role.value, "NAME": "handler", "INTEREST": interest}
    return values | ({"KEY": "id"} if role is Role.PROCESS_MANAGER else {})


TOKEN_RULE = "is not allowed: use 1-128 characters from A-Z a-z 0-9 _ - ="


@st.composite
def invalid_links(draw: st.DrawFn) -> Case:
    defect = draw(st.sampled_from(["missing", "unknown role", "unsafe name", "unsafe stream", "no event types",
                                   "unsafe event type", "lifetime not JSON", "lifetime shape", "no process key",
                                   "not positive", "out of range"]))
    if defect == "missing":
        values = _plain_link(draw(st.sampled_from(list(Role))), "x")
        field = draw(st.sampled_from(["ROLE", "NAME", "INTEREST"]))
        if draw(st.booleans()):
            del values[field]
        else:
            values[field] = draw(st.sampled_from(["", " ", "\t"]))
        return Case(defect, values, error=f"link is missing required value(s): {field}")
    if defect == "unknown role":
        role = draw(st.text(min_size=1, max_size=12).filter(
            lambda r: r.strip() and snake_case(r) not in {x.value for x in Role}))
        values = _plain_link(Role.PROJECTOR, "x") | {"ROLE": role}
        return Case(defect, values, error=f"unknown ROLE {role.strip()!r}: expected one of "
                                          "aggregate, projector, process_manager, notifier")
    if defect == "unsafe name":
        name = draw(unsafe_tokens())
        return Case(defect, _plain_link(Role.AGGREGATE, "x") | {"NAME": name}, error=f"NAME {name!r} {TOKEN_RULE}")
    if defect == "unsafe stream":
        stream = draw(unsafe_tokens())
        return Case(defect, _plain_link(Role.AGGREGATE, stream),
                    error=f"aggregate INTEREST (stream name) {stream!r} {TOKEN_RULE}")
    if defect == "no event types":
        role = draw(st.sampled_from([Role.PROJECTOR, Role.NOTIFIER]))
        return Case(defect, _plain_link(role, draw(st.sampled_from([",", " , ", ",,,"]))),
                    error=f"{role.value} INTEREST must list at least one event type")
    if defect == "unsafe event type":
        role = draw(st.sampled_from([Role.PROJECTOR, Role.NOTIFIER]))
        bad = draw(unsafe_tokens())
        return Case(defect, _plain_link(role, f"good_one,{bad}"),
                    error=f"event type in INTEREST {snake_case(bad)!r} {TOKEN_RULE}")
    if defect == "lifetime not JSON":
        raw = draw(st.sampled_from(['{"start": ', "start=a", "{'start': 'a'}", "[", "a,b"]))
        return Case(defect, _plain_link(Role.PROCESS_MANAGER, raw), error="process manager INTEREST is not valid JSON")
    if defect == "lifetime shape":
        doc = draw(st.sampled_from([{"advance": ["a"]}, {"start": 1}, [], {"start": ["a"]}]))
        return Case(defect, _plain_link(Role.PROCESS_MANAGER, json.dumps(doc)),
                    error='process manager INTEREST must be {"start": "evt", "advance": [...], "stop": [...]}')
    if defect == "no process key":
        values = _plain_link(Role.PROCESS_MANAGER, '{"start": "a"}')
        del values["KEY"]
        return Case(defect, values, error="process manager link needs KEY: the event field that holds the process key")
    field = draw(st.sampled_from(["CALL_TIMEOUT_MS", "MAX_DELIVERIES", "MAX_MEMORY_MB", "ACK_WAIT_MS"]))
    if defect == "out of range":
        bound = LINK_BOUNDS[field]
        number = draw(st.integers(1, bound.low - 1) | st.integers(min_value=bound.high + 1) if bound.low > 1
                      else st.integers(min_value=bound.high + 1))
        return Case(defect, _plain_link(Role.AGGREGATE, "x") | {field: str(number)},
                    error=f"{field} {str(number)!r} is out of range: it must be {bound.describe()}")
    raw = draw(st.sampled_from(["0", "-1", "abc", "1.5"]) | st.integers(max_value=0).map(str))
    return Case(defect, _plain_link(Role.AGGREGATE, "x") | {field: raw},
                error=f"{field} must be a positive integer, got {raw!r}")


links = st.one_of(valid_links(), invalid_links())


def _check_link(case: Case) -> str:
    try:
        interest = parse_interest(case.body)
    except LinkError as exc:
        assert case.kind != "valid", f"valid link values {case.body!r} refused: {exc}"
        assert case.error is not None
        if case.kind == "lifetime not JSON":
            assert str(exc).startswith(case.error + " (")
        else:
            assert str(exc) == case.error
        return "refused"
    assert case.kind == "valid", f"{case.kind} link values {case.body!r} accepted as {interest!r}"
    got = {name: getattr(interest, name) for name in case.expected}
    assert got == case.expected
    for event_type in interest.interested_event_types:
        assert check_token(event_type, "event type") == event_type
    return "accepted"


@PROPERTY
@given(links)
def test_generated_link_values_give_their_interest_or_their_error(case):
    event(f"{case.kind}: {_check_link(case)}")


def test_a_real_share_of_generated_link_values_is_accepted():
    seen = _outcomes(links, _check_link)
    total = sum(seen.values())
    assert total >= 100
    assert seen["accepted"] >= total * 0.1 and seen["refused"] >= total * 0.1, seen


link_keys = st.sampled_from(["ROLE", "role", " Name ", "INTEREST", "interest", "KEY",
                             "MAX_MESSAGES_PER_BATCH", "CONFIG_B64", "CALL_TIMEOUT_MS", "other"])
link_texts = st.text(max_size=40) | st.sampled_from(
    ["aggregate", "projector", "process_manager", "notifier", "bankaccount", '{"start":"a"}', "a,b", "-1", "0"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(link_keys, link_texts, max_size=6))
def test_arbitrary_link_values_never_crash_parsing(values):
    """Whatever a manifest holds: an Interest whose names are safe tokens, or a LinkError."""
    try:
        interest = parse_interest(values)
    except LinkError as exc:
        assert str(exc)
        return
    assert check_token(interest.name, "name") == interest.name
    for event_type in interest.interested_event_types:
        assert check_token(event_type, "event type") == event_type
