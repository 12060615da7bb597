import json

import pytest

from concordance_provider.wire import (
    STREAM_EXTENSION,
    BadMessage,
    CloudEvent,
    CommandResult,
    new_event,
    parse_command,
    parse_event,
)


def test_parse_command_valid_and_normalises_type():
    cmd = parse_command(b'{"command_type": "DepositFunds", "key": "ACC-1", "data": {"amount": 5}, "extra": 1}')
    assert cmd.command_type == "deposit_funds"
    assert cmd.key == "ACC-1"
    assert cmd.data == {"amount": 5}


def test_parse_command_empty_data_is_an_empty_object():
    assert parse_command(b'{"command_type": "open", "key": "k", "data": {}}').data == {}


@pytest.mark.parametrize("body", [b"not json", b"{", b""])
def test_parse_command_invalid_json(body):
    with pytest.raises(BadMessage, match="malformed command: body: Invalid JSON"):
        parse_command(body)


@pytest.mark.parametrize("missing", ["command_type", "key", "data"])
def test_parse_command_missing_field_is_named(missing):
    doc = {"command_type": "open", "key": "k", "data": {}}
    del doc[missing]
    with pytest.raises(BadMessage) as err:
        parse_command(json.dumps(doc).encode())
    assert str(err.value) == f"malformed command: {missing}: Field required"


@pytest.mark.parametrize("field, value, message", [
    ("command_type", 5, "command_type: Input should be a valid string"),
    ("command_type", None, "command_type: Input should be a valid string"),
    ("key", ["k"], "key: Input should be a valid string"),
    ("data", [1], "data: Input should be an object"),
    ("data", None, "data: Input should be an object"),
    ("data", "{}", "data: Input should be an object"),
])
def test_parse_command_mistyped_field_is_named(field, value, message):
    doc = {"command_type": "open", "key": "k", "data": {}} | {field: value}
    with pytest.raises(BadMessage) as err:
        parse_command(json.dumps(doc).encode())
    assert str(err.value) == f"malformed command: {message}"


@pytest.mark.parametrize("key", ["a.b", "*", ">", "has space", "", "x" * 129, "abc\n"])
def test_parse_command_unsafe_key_rejected(key):
    with pytest.raises(BadMessage) as err:
        parse_command(json.dumps({"command_type": "open", "key": key, "data": {}}).encode())
    assert str(err.value).startswith("malformed command: key: ")
    assert f"key {key!r} is not allowed" in str(err.value)


@pytest.mark.parametrize("command_type", ["a.b", "*", ">", ""])
def test_parse_command_unsafe_command_type_rejected(command_type):
    with pytest.raises(BadMessage) as err:
        parse_command(json.dumps({"command_type": command_type, "key": "k", "data": {}}).encode())
    assert str(err.value).startswith("malformed command: command_type: ")
    assert f"command_type {command_type!r} is not allowed" in str(err.value)


def test_new_event_cloud_event_json():
    event = new_event("funds_deposited", "bankaccount", "ACC-1", '{"amount": 5}')
    doc = json.loads(event.to_json())
    assert doc["specversion"] == "1.0"
    assert doc["source"] == "concordance"
    assert doc["datacontenttype"] == "application/json"
    assert doc["type"] == "funds_deposited"
    assert doc["subject"] == "ACC-1"
    assert doc["data"] == {"amount": 5}
    assert doc[STREAM_EXTENSION] == "bankaccount"
    assert STREAM_EXTENSION == "x-concordance-stream"
    assert "stream" not in doc
    assert doc["id"] and doc["time"]


def test_new_event_ids_are_unique():
    a = new_event("t", "s", "k", "{}")
    b = new_event("t", "s", "k", "{}")
    assert a.id != b.id


def test_new_event_rejects_non_json_payload():
    with pytest.raises(BadMessage) as err:
        new_event("funds_deposited", "bankaccount", "ACC-1", "not json")
    assert "'funds_deposited'" in str(err.value)
    assert "not JSON" in str(err.value)


def test_parse_event_round_trip():
    event = new_event("funds_deposited", "bankaccount", "ACC-1", '{"amount": 5}')
    back = parse_event(event.to_json())
    assert back.stream == "bankaccount"
    assert back.id == event.id
    assert back.data == {"amount": 5}


def test_parse_event_requires_stream_extension():
    with pytest.raises(BadMessage, match="malformed event"):
        parse_event(b'{"specversion": "1.0", "type": "t", "id": "1"}')
    with pytest.raises(BadMessage, match="malformed event"):
        parse_event(b"nope")


def test_cloud_event_populate_by_name():
    assert CloudEvent(type="t", stream="s").stream == "s"


def test_command_result_status_is_constrained():
    assert CommandResult(status="accepted", aggregate="a").events == []
    with pytest.raises(ValueError):
        CommandResult(status="maybe", aggregate="a")
