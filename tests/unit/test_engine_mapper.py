"""The event mapper: component event, CloudEvent and stored message, and back."""

from __future__ import annotations

import json

import pytest

from concordance_provider.engine.mapper import (
    CAUSATION,
    MESSAGE_ID,
    LoggedEvent,
    from_message,
    stored_form,
    to_cloud_event,
    to_component,
    to_message,
)
from concordance_provider.runtime import Event
from concordance_provider.wire import STREAM_EXTENSION, BadMessage


def test_a_component_event_becomes_a_cloud_event_of_the_aggregates_stream():
    cloud = to_cloud_event(Event("FundsDeposited", "", '{"amount": 5}'), "bank", "A-1")
    assert (cloud.type, cloud.stream, cloud.subject, cloud.data) == ("funds_deposited", "bank", "A-1", {"amount": 5})


@pytest.mark.parametrize("event_type", ["funds.deposited", "*", ">", "", "x" * 129])
def test_an_event_type_that_is_not_one_token_is_refused(event_type):
    with pytest.raises(BadMessage, match="event type"):
        to_cloud_event(Event(event_type, "bank", "{}"), "bank", "A")


def test_a_payload_that_is_not_json_is_refused():
    with pytest.raises(BadMessage, match="payload is not JSON"):
        to_cloud_event(Event("funds_deposited", "bank", "{"), "bank", "A")


def test_the_stored_message_has_the_instance_subject_the_json_and_who_caused_it():
    cloud = to_cloud_event(Event("funds_deposited", "bank", '{"amount": 5}'), "bank", "A")
    message = to_message(cloud, "A", "command:7", "command:7:0")
    assert message.subject == "cc.events.funds_deposited.bank.A"
    assert message.headers == {CAUSATION: "command:7", MESSAGE_ID: "command:7:0"}
    body = json.loads(message.data)
    assert body["type"] == "funds_deposited" and body[STREAM_EXTENSION] == "bank" and body["data"] == {"amount": 5}


def test_a_stored_message_reads_back_as_the_event_and_then_as_the_component_event():
    cloud = to_cloud_event(Event("funds_deposited", "bank", '{"amount":5}'), "bank", "A")
    message = to_message(cloud, "A", "command:7", "command:7:0")
    event = from_message(42, message.subject, message.headers, message.data)
    assert (event.seq, event.event_type, event.stream, event.key, event.causation) == (
        42, "funds_deposited", "bank", "A", "command:7")
    assert event.cloud_event.id == cloud.id
    assert to_component(event) == Event("funds_deposited", "bank", '{"amount": 5}')
    assert stored_form(message) == LoggedEvent(0, "funds_deposited", "bank", "A", event.cloud_event, "command:7")


def test_the_stored_form_is_what_json_keeps():
    cloud = to_cloud_event(Event("measured", "bank", '{"a": 1e400, "b": NaN, "c": 1.5}'), "bank", "A")
    event = stored_form(to_message(cloud, "A", "command:1", "command:1:0"))
    assert to_component(event).payload == '{"a": null, "b": null, "c": 1.5}'


def test_data_that_cannot_be_written_as_json_is_refused():
    cloud = to_cloud_event(Event("note_added", "bank", '{"note": "\\ud800"}'), "bank", "A")
    with pytest.raises(BadMessage, match="cannot be written as JSON"):
        to_message(cloud, "A", "command:1", "command:1:0")


@pytest.mark.parametrize("subject", ["cc.events.t.bank", "cc.commands.t.bank.A", "cc.events.t.bank.A.more",
                                     "cc.events..bank.A"])
def test_a_message_on_a_subject_that_is_not_an_event_subject_is_not_an_event(subject):
    with pytest.raises(BadMessage, match="not an event subject"):
        from_message(1, subject, {}, b"{}")


@pytest.mark.parametrize("data", [b"not json", b"{}", b'{"type": "t"}', b"\xff"])
def test_a_body_that_is_not_a_cloud_event_is_not_an_event(data):
    with pytest.raises(BadMessage, match="malformed event"):
        from_message(1, "cc.events.t.bank.A", {}, data)


def test_a_retried_event_reads_as_its_original_instance_without_causation():
    body = to_message(to_cloud_event(Event("t", "bank", "{}"), "bank", "A"), "A", "c", "i").data
    event = from_message(3, "cc.events.t.bank.A.retry", {}, body)
    assert (event.event_type, event.stream, event.key, event.causation) == ("t", "bank", "A", None)


def test_any_stored_message_reads_as_a_logged_event():
    class Stored:
        seq, subject, headers = 9, "cc.events.t.bank.A", {CAUSATION: "event:1"}
        data = to_message(to_cloud_event(Event("t", "bank", "{}"), "bank", "A"), "A", "x", "y").data

    event = LoggedEvent.from_message(Stored())
    assert (event.seq, event.causation) == (9, "event:1")
