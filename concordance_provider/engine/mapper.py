"""An event in its three forms, and every conversion between them.

- the **component event** (``runtime.Event``): what a component returns and folds;
- the **CloudEvent** (``wire.CloudEvent``): what the contract publishes;
- the **stored message** (``EventMessage`` out, ``LoggedEvent`` back): subject
  ``cc.events.{type}.{stream}.{key}``, the CloudEvent's JSON, and the causation header.

A command's events are folded from their stored form read back (``stored_form``), so the state a
command saves is exactly the state a replay of the log computes. With a signing key, a stored
message is an event only if its signature holds (``signing``): ``Forged`` otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

import structlog

from ..naming import InvalidName, check_token, event_subject, parse_event_subject, snake_case
from ..runtime import Event
from ..signing import SIGNATURE, Chain, Forged, Position, Signer, check_fresh
from ..tracing import TRACEPARENT
from ..wire import BadMessage, CloudEvent, new_event, parse_event

log = structlog.get_logger(__name__)

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
    position: Position | None = None  # where its signature says it was appended (verified events only)

    @classmethod
    def from_message(cls, msg: StoredLike, signer: Signer | None = None) -> "LoggedEvent":
        """Any stored message with ``seq``, ``subject``, ``headers`` and ``data``."""
        return from_message(msg.seq, msg.subject, msg.headers, msg.data, signer)


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


def from_message(seq: int, subject: str, headers: dict[str, str], data: bytes, signer: Signer | None = None,
                 stored_at: datetime | None = None) -> LoggedEvent:
    """A stored or delivered message as an event; BadMessage if it is not one (anyone may publish
    on ``cc.events.>``). With ``signer``, Forged unless its signature holds, and, given the time it
    was stored, unless it was stored soon after it was made (not a copy published again)."""
    try:
        event_type, stream, key = parse_event_subject(subject)
    except InvalidName as exc:
        raise BadMessage(str(exc)) from None
    cloud_event = parse_event(data)
    position = None
    if signer is not None:
        seal = signer.verify_event(subject, headers.get(MESSAGE_ID), headers.get(CAUSATION), data,
                                   headers.get(SIGNATURE))
        if stored_at is not None:
            check_fresh(seal, stored_at)
        position = seal.position
    return LoggedEvent(seq, event_type, stream, key, cloud_event, headers.get(CAUSATION), position)


def signed(message: EventMessage, signer: Signer, position: Position | None = None) -> EventMessage:
    """``message`` with its signature: of its content and, for an aggregate's event, its position."""
    headers = message.headers
    signature = signer.sign_event(message.subject, headers.get(MESSAGE_ID, ""), headers.get(CAUSATION, ""),
                                  message.data, position)
    return replace(message, headers={**headers, SIGNATURE: signature})


def signed_append(messages: Sequence[EventMessage], signer: Signer | None,
                  expected_last_seq: int) -> list[EventMessage]:
    """The messages of one guarded append, each signed with its place in it (as they are without a key)."""
    if signer is None:
        return list(messages)
    return [signed(m, signer, Position(expected_last_seq, index)) for index, m in enumerate(messages)]


def logged_event(msg: StoredLike, signer: Signer | None) -> LoggedEvent | None:
    """A stored message as an event, or None (logged) for one that is not an event or is forged."""
    try:
        return from_message(msg.seq, msg.subject, msg.headers, msg.data, signer)
    except Forged as exc:
        log.error("forged event; left out", subject=msg.subject, seq=msg.seq, error=str(exc))
    except BadMessage as exc:
        log.error("not an event; left out of the fold", subject=msg.subject, seq=msg.seq, error=str(exc))
    return None


class InstanceEvents:
    """One instance's messages read in log order after ``after_seq``, as the events to fold: with a
    key, only those signed and standing where they were appended (``signing.Chain``)."""

    def __init__(self, signer: Signer | None, after_seq: int = 0) -> None:
        self._signer = signer
        self._chain = Chain(after_seq)

    def event(self, msg: StoredLike) -> LoggedEvent | None:
        event = logged_event(msg, self._signer)
        if event is None or self._signer is None or self._chain.admits(event.seq, event.position):
            return event
        log.error("forged event: a genuine event out of the place it was appended; left out", subject=msg.subject,
                  seq=msg.seq, appended_after=event.position and event.position.previous)
        return None


def to_component(event: LoggedEvent) -> Event:
    """What a component is given to fold or handle."""
    return Event(event.event_type, event.stream, json.dumps(event.cloud_event.data))


def stored_form(message: EventMessage) -> LoggedEvent:
    """The event a later read of ``message`` will return (its sequence not known yet: 0)."""
    return from_message(0, message.subject, message.headers, message.data)
