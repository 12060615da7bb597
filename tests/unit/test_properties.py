"""Property-based checks: no input makes the parsers fail in an undefined way."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concordance_provider.links import LinkError, parse_interest
from concordance_provider.naming import (
    InvalidName,
    check_token,
    command_subject,
    event_subject,
)
from concordance_provider.wire import BadMessage, parse_command

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
raw_commands = st.fixed_dictionaries(
    {}, optional={"command_type": json_values | st.text(), "key": json_values | st.text(), "data": json_values},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_commands)
def test_any_command_is_parsed_or_refused_with_bad_message(body):
    try:
        command = parse_command(json.dumps(body).encode())
    except BadMessage as exc:
        assert str(exc).startswith("malformed command")
        return
    # whatever is accepted can never reach outside its own subject and state key
    assert check_token(command.key, "key") == command.key
    assert command_subject("agg").count(".") == 2
    assert event_subject(command.command_type, "agg", command.key).count(".") == 4


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_command_parsing(body):
    try:
        parse_command(body)
    except BadMessage:
        pass


link_keys = st.sampled_from(["ROLE", "role", " Name ", "INTEREST", "interest", "KEY",
                             "MAX_MESSAGES_PER_BATCH", "CONFIG_B64", "CALL_TIMEOUT_MS", "other"])
link_texts = st.text(max_size=40) | st.sampled_from(
    ["aggregate", "projector", "process_manager", "notifier", "bankaccount", '{"start":"a"}', "a,b", "-1", "0"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(link_keys, link_texts, max_size=6))
def test_any_link_values_give_an_interest_or_a_link_error(values):
    try:
        interest = parse_interest(values)
    except LinkError as exc:
        assert str(exc)
        return
    assert check_token(interest.name, "name") == interest.name
    for event_type in interest.interested_event_types:
        try:
            check_token(event_type, "event type")
        except InvalidName:  # pragma: no cover - a failure here is the bug
            raise AssertionError(f"unsafe event type {event_type!r} accepted")
