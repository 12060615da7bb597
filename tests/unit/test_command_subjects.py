"""Commands scoped by key: the subjects, the key check, the outcome keys and the stream migration."""

from __future__ import annotations

import json

import pytest
from nats.js.api import RetentionPolicy, StreamConfig

from concordance_provider.naming import (
    InvalidName,
    any_result_key,
    command_filters,
    command_subject,
    parse_command_subject,
    result_key,
    result_seq,
)
from concordance_provider.store.commands import must_wait, ordering_key
from concordance_provider.store.streams import _check, _missing_subjects, commands_config, events_config
from concordance_provider.wire import BadMessage, KeyMismatch, parse_command


def body(key: object) -> bytes:
    return json.dumps({"command_type": "deposit_funds", "key": key, "data": {"amount": 1}}).encode()


# -- subjects -------------------------------------------------------------------------------------

def test_a_command_goes_on_the_aggregate_subject_or_on_its_key_subject() -> None:
    assert command_subject("bankaccount") == "cc.commands.bankaccount"
    assert command_subject("bankaccount", "ABC123") == "cc.commands.bankaccount.ABC123"
    assert command_filters("bankaccount") == ("cc.commands.bankaccount", "cc.commands.bankaccount.*")


@pytest.mark.parametrize("subject, parsed", [
    ("cc.commands.bankaccount", ("bankaccount", None)),
    ("cc.commands.bankaccount.ABC123", ("bankaccount", "ABC123")),
])
def test_a_command_subject_names_its_aggregate_and_maybe_its_key(subject: str, parsed: tuple) -> None:
    assert parse_command_subject(subject) == parsed


@pytest.mark.parametrize("subject", ["cc.commands", "cc.events.x.y", "cc.commands.a.b.c", "cc.commands..k", "x.y.z"])
def test_anything_else_is_not_a_command_subject(subject: str) -> None:
    with pytest.raises(InvalidName, match="not a command subject"):
        parse_command_subject(subject)


# -- the key in the subject and in the body ----------------------------------------------------

def test_the_body_key_must_equal_the_subject_key() -> None:
    assert parse_command(body("ABC123"), "ABC123").key == "ABC123"
    with pytest.raises(KeyMismatch) as err:
        parse_command(body("OTHER"), "ABC123")
    assert "'ABC123'" in str(err.value) and "'OTHER'" in str(err.value) and "not decided" in str(err.value)


def test_without_a_subject_key_the_body_key_alone_counts() -> None:
    assert parse_command(body("OTHER")).key == "OTHER"


def test_a_malformed_body_is_malformed_whatever_the_subject_says() -> None:
    with pytest.raises(BadMessage) as err:
        parse_command(b"{not json", "ABC123")
    assert not isinstance(err.value, KeyMismatch)


@pytest.mark.parametrize("subject, data, key", [
    ("cc.commands.bankaccount", body("ABC"), "ABC"),
    ("cc.commands.bankaccount.ABC", body("ABC"), "ABC"),
    ("cc.commands.bankaccount.ABC", body("OTHER"), "ABC"),  # rejected undecided: ordered by its subject
    ("cc.commands.bankaccount.ABC", b"{not json", "ABC"),
    ("cc.commands.bankaccount", b"{not json", None),
])
def test_a_command_is_ordered_by_its_subject_key_else_its_body_key(subject: str, data: bytes, key: str | None) -> None:
    assert ordering_key(subject, data) == key


def test_one_key_waits_across_both_subjects() -> None:
    # 3 came on cc.commands.bankaccount (key in the body), 5 on cc.commands.bankaccount.A; another
    # daemon holds 3, so 5 waits for it
    stored = [(3, ordering_key("cc.commands.bankaccount", body("A"))),
              (5, ordering_key("cc.commands.bankaccount.A", body("A")))]
    assert must_wait([stored[1]], stored) == {5: (3,)}


# -- outcome keys ---------------------------------------------------------------------------------

def test_an_outcome_is_keyed_by_aggregate_key_and_sequence() -> None:
    assert result_key("bankaccount", "ABC123", 42) == "bankaccount.ABC123.42"
    assert result_seq("bankaccount.ABC123.42") == 42
    assert any_result_key(42) == "*.*.42"


@pytest.mark.parametrize("aggregate, key, expected", [
    ("bankaccount", None, "bankaccount._.7"),
    ("bankaccount", "a.b", "bankaccount._.7"),  # never a key that spans tokens
    ("bankaccount", "*", "bankaccount._.7"),
    ("bankaccount", "", "bankaccount._.7"),
    ("bad$name", "ABC", "_.ABC.7"),
    (None, None, "_._.7"),
])
def test_a_missing_or_unsafe_name_or_key_is_an_underscore(aggregate, key, expected) -> None:
    assert result_key(aggregate, key, 7) == expected


# -- CC_COMMANDS at start -------------------------------------------------------------------------

def test_a_commands_stream_of_the_earlier_scheme_gains_the_key_subject() -> None:
    earlier = StreamConfig(name="CC_COMMANDS", subjects=["cc.commands.*"], retention=RetentionPolicy.WORK_QUEUE)
    wanted = commands_config()
    assert wanted.subjects == ["cc.commands.*", "cc.commands.*.*"]
    assert _check(earlier, wanted) == []
    assert _missing_subjects(earlier, wanted) == ["cc.commands.*.*"]
    assert _missing_subjects(wanted, wanted) == []


def test_a_stream_with_subjects_beyond_the_wanted_ones_is_still_refused() -> None:
    original = StreamConfig(name="CC_EVENTS", subjects=["cc.events.*"], retention=RetentionPolicy.LIMITS)
    assert _check(original, events_config()) == ["subjects are ['cc.events.*'], needs ['cc.events.>']"]
    foreign = StreamConfig(name="CC_COMMANDS", subjects=["cc.commands.>"], retention=RetentionPolicy.WORK_QUEUE)
    assert _check(foreign, commands_config())
