"""The event log in JetStream, CC_EVENTS: the engine's ``EventLog`` (see ``engine.persistence``).

An instance's messages are those on ``cc.events.*.{stream}.{key}``; an append is guarded by the
last of them (``Nats-Expected-Last-Subject-Sequence`` with that filter). One event is one plain
publish with the guard; several are one atomic batch (about ten times the server's work per
commit). Reads go a page at a time with batched direct gets, so no read holds a whole history.
With a signing key, appends and the events a gateway reports are signed, and reads leave out what
does not verify (see ``engine.persistence``).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import AsyncIterator, Sequence

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ..engine.mapper import (
    CAUSATION,
    MESSAGE_ID,
    EventMessage,
    InstanceEvents,
    LoggedEvent,
    logged_event,
    signed,
    signed_append,
    to_message,
)
from ..engine.persistence import AlreadyAppended, AppendConflict, EventTooLarge
from ..naming import EVENTS_STREAM, instance_filter, parse_event_subject, stream_filter
from ..signing import REPLAY_WINDOW, Signer
from ..wire import CloudEvent
from .jetstream import (
    WRONG_LAST_SEQUENCE,
    JetStreamError,
    PayloadTooLarge,
    StoredMessage,
    WrongLastSequence,
    direct_get,
    direct_get_batch,
    publish,
    publish_atomic,
)
from .streams import IncompatibleStream

log = structlog.get_logger(__name__)

__all__ = ["CAUSATION", "EventLog", "LoggedEvent"]

PAGE_SIZE = 256  # messages per direct-get batch
PUBLISH_TIMEOUT = 5.0  # seconds for the stream's ack
DUPLICATE_IN_BATCH = 10201  # an atomic batch carries a message id the stream already holds


def _timestamp(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


class EventLog:
    """Only the engine appends to aggregate streams, so a foreign message there is left out of the
    reads (and logged) rather than break the instance."""

    def __init__(self, nc: NATS, signer: Signer | None = None) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.signer = signer

    async def last_seq(self, stream: str, key: str) -> int:
        msg = await direct_get(self._nc, EVENTS_STREAM, last_by_subj=instance_filter(stream, key))
        return msg.seq if msg else 0

    async def keys(self, stream: str) -> list[str]:
        info = await self._js.stream_info(EVENTS_STREAM, subjects_filter=stream_filter(stream))
        return sorted({parse_event_subject(s)[2] for s in (info.state.subjects or {})})

    async def _pages(self, subject: str, *, after_seq: int = 0,
                     since: datetime | None = None) -> AsyncIterator[list[StoredMessage]]:
        if since is not None:
            page = await direct_get_batch(self._nc, EVENTS_STREAM, subject, start_time=_timestamp(since),
                                          limit=PAGE_SIZE)
        else:
            page = await direct_get_batch(self._nc, EVENTS_STREAM, subject, start_seq=after_seq + 1,
                                          limit=PAGE_SIZE)
        while True:
            if page:
                yield page
            if len(page) < PAGE_SIZE:
                return
            page = await direct_get_batch(self._nc, EVENTS_STREAM, subject, start_seq=page[-1].seq + 1,
                                          limit=PAGE_SIZE)

    async def events(self, stream: str, key: str, after_seq: int = 0) -> AsyncIterator[LoggedEvent]:
        reading = InstanceEvents(self.signer, after_seq)
        async for page in self._pages(instance_filter(stream, key), after_seq=after_seq):
            for msg in page:
                if (event := reading.event(msg)) is not None:
                    yield event

    async def caused_by(self, stream: str, key: str, causation: str, since: datetime) -> list[LoggedEvent]:
        found = []
        async for page in self._pages(instance_filter(stream, key), since=since):
            for msg in page:
                if msg.headers.get(CAUSATION) == causation and (event := logged_event(msg, self.signer)) is not None:
                    found.append(event)
        return found

    async def append(self, stream: str, key: str, messages: Sequence[EventMessage], *,
                     expected_last_seq: int) -> list[int]:
        guard = {
            "Nats-Expected-Last-Subject-Sequence": str(expected_last_seq),
            "Nats-Expected-Last-Subject-Sequence-Subject": instance_filter(stream, key),
        }
        messages = signed_append(messages, self.signer, expected_last_seq)
        if len(messages) == 1:
            return [await self._publish_guarded(messages[0], guard)]
        try:
            return await publish_atomic(self._nc, [(m.subject, m.data, m.headers) for m in messages], guard)
        except WrongLastSequence as exc:
            raise AppendConflict(str(exc)) from None
        except PayloadTooLarge as exc:
            raise EventTooLarge(str(exc)) from None
        except JetStreamError as exc:
            if exc.code == DUPLICATE_IN_BATCH:
                raise AlreadyAppended(str(exc)) from None
            raise

    async def _publish_guarded(self, message: EventMessage, guard: dict[str, str]) -> int:
        if len(message.data) > self._nc.max_payload:
            raise EventTooLarge(f"{message.subject}: {len(message.data)} bytes is over the NATS maximum "
                                f"payload of {self._nc.max_payload}")
        reply = await self._nc.request(message.subject, message.data, headers={**message.headers, **guard},
                                       timeout=PUBLISH_TIMEOUT)
        ack = json.loads(reply.data)
        error = ack.get("error")
        if error:
            code, description = int(error.get("err_code", 0)), str(error.get("description", "unknown error"))
            if code == WRONG_LAST_SEQUENCE:
                raise AppendConflict(description)
            raise JetStreamError(code, description)
        if ack.get("duplicate"):  # the guard held, and the stream already has this message id
            raise AlreadyAppended(f"{message.subject}: message id {message.headers.get(MESSAGE_ID)} is stored")
        return int(ack["seq"])

    async def publish_one(self, event: CloudEvent, key: str, msg_id: str, causation: str,
                          traceparent: str | None = None) -> int:
        """An event reported by a gateway: not guarded, deduplicated by ``msg_id``."""
        message = to_message(event, key, causation, msg_id, traceparent)
        if self.signer is not None:
            message = signed(message, self.signer)
        return await publish(self._nc, message.subject, message.data, message.headers)


async def require_duplicate_window(js: JetStreamContext) -> None:
    """With a signing key, CC_EVENTS must drop a copy of an event by its message id for longer than
    consumers take it for fresh (``signing.REPLAY_WINDOW``); IncompatibleStream otherwise."""
    window = (await js.stream_info(EVENTS_STREAM)).config.duplicate_window or 0
    if window < REPLAY_WINDOW.total_seconds():
        raise IncompatibleStream(
            f"stream {EVENTS_STREAM} drops duplicates for {window:.0f} s; with a signing key it must for at "
            f"least {REPLAY_WINDOW.total_seconds():.0f} s, or a copy of an event could be taken for new: "
            f"nats stream edit {EVENTS_STREAM} --dupe-window 24h")
