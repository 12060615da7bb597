"""An event in its three forms, and every conversion between them.

- the **component event** (``runtime.Event``): what a component returns and folds;
- the **CloudEvent** (``wire.CloudEvent``): what the contract publishes;
- the **stored message** (``EventMessage`` out, ``LoggedEvent`` back): subject
  ``cc.events.{type}.{stream}.{key}``, the CloudEvent's JSON, and the causation header.

A command's events are folded from their stored form read back (``stored_form``), so the state a
command saves is exactly the state a replay of the log computes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from ..naming import InvalidName, check_token, event_subject, parse_event_subject, snake_case
from ..runtime import Event
from ..tracing import TRACEPARENT
from ..wire import BadMessage, CloudEvent, new_event, parse_event

CAUSATION = "Concordance-Causation"  # header: what produced the event, e.g. "command:42"
MESSAGE_ID = "Nats-Msg-Id"  # header: the log drops a second message with the same id


class StoredLike(Protocol):
    """A message read from a stream (``store.jetstream.StoredMessage`` is one)."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes


@dataclass(frozen=True)
class EventMessage:
    """An event as the log stores it, before it has a sequence."""

    subject: str
    data: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class LoggedEvent:
    """An event read back from the log (or delivered by a consumer), with its sequence."""

    seq: int
    event_type: str
    stream: str
    key: str
    cloud_event: CloudEvent
    causation: str | None

    @classmethod
    def from_message(cls, msg: StoredLike) -> "LoggedEvent":
        """Any stored message with ``seq``, ``subject``, ``headers`` and ``data``."""
        return from_message(msg.seq, msg.subject, msg.headers, msg.data)


def to_cloud_event(event: Event, stream: str, key: str) -> CloudEvent:
    """A component's event as the CloudEvent to store; BadMessage if it cannot be one."""
    try:
        event_type = check_token(snake_case(event.event_type), "event type")
    except InvalidName as exc:
        raise BadMessage(str(exc)) from None
    return new_event(event_type, stream, key, event.payload)


def to_message(event: CloudEvent, key: str, causation: str, message_id: str,
               traceparent: str | None = None) -> EventMessage:
    """The stored form of ``event``: its subject, its JSON, and who caused it; BadMessage if its data
    cannot be written as JSON (a lone surrogate in a string, for one)."""
    try:
        data = event.to_json()
    except ValueError as exc:
        raise BadMessage(f"event {event.type!r} cannot be written as JSON: {exc}") from None
    headers = {CAUSATION: causation, MESSAGE_ID: message_id}
    if traceparent is not None:
        headers[TRACEPARENT] = traceparent
    return EventMessage(event_subject(event.type, event.stream, key), data, headers)


def from_message(seq: int, subject: str, headers: dict[str, str], data: bytes) -> LoggedEvent:
    """A stored or delivered message as an event; BadMessage if it is not one (anyone may publish
    on ``cc.events.>``)."""
    try:
        event_type, stream, key = parse_event_subject(subject)
    except InvalidName as exc:
        raise BadMessage(str(exc)) from None
    return LoggedEvent(seq, event_type, stream, key, parse_event(data), headers.get(CAUSATION))


def to_component(event: LoggedEvent) -> Event:
    """What a component is given to fold or handle."""
    return Event(event.event_type, event.stream, json.dumps(event.cloud_event.data))


def stored_form(message: EventMessage) -> LoggedEvent:
    """The event a later read of ``message`` will return (its sequence not known yet: 0)."""
    return from_message(0, message.subject, message.headers, message.data)
