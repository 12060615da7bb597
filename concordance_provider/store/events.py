"""The event log, CC_EVENTS: guarded atomic appends and per-instance reads."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from ..naming import (
    EVENTS_STREAM,
    InvalidName,
    event_subject,
    instance_filter,
    parse_event_subject,
    stream_filter,
)
from ..wire import BadMessage, CloudEvent, parse_event
from .jetstream import StoredMessage, direct_get, publish, publish_atomic, read_all

log = structlog.get_logger(__name__)

CAUSATION = "Concordance-Causation"  # what produced the event, e.g. "command:42"


@dataclass(frozen=True)
class LoggedEvent:
    seq: int
    event_type: str
    stream: str
    key: str
    cloud_event: CloudEvent
    causation: str | None

    @classmethod
    def from_delivery(cls, msg: Msg) -> "LoggedEvent":
        """An event delivered by a consumer."""
        return cls.from_message(StoredMessage(msg.metadata.sequence.stream, msg.subject,
                                              dict(msg.headers or {}), msg.data, ""))

    @classmethod
    def from_message(cls, msg: StoredMessage) -> "LoggedEvent":
        event_type, stream, key = parse_event_subject(msg.subject)
        return cls(msg.seq, event_type, stream, key, parse_event(msg.data), msg.headers.get(CAUSATION))


def _decode(msg: StoredMessage) -> LoggedEvent | None:
    """An instance's event, or None (logged) for something that is not one: only the engine
    appends to aggregate streams, so a foreign message there must not break the instance."""
    try:
        return LoggedEvent.from_message(msg)
    except (BadMessage, InvalidName) as exc:
        log.error("not an event; left out of the fold", subject=msg.subject, seq=msg.seq, error=str(exc))
        return None


class EventLog:
    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._js = nc.jetstream()

    async def last_seq(self, stream: str, key: str) -> int:
        """Sequence of the instance's latest event, 0 if it has none."""
        msg = await direct_get(self._nc, EVENTS_STREAM, last_by_subj=instance_filter(stream, key))
        return msg.seq if msg else 0

    async def keys(self, stream: str) -> list[str]:
        """The keys of every instance of ``stream`` that has events."""
        info = await self._js.stream_info(EVENTS_STREAM, subjects_filter=stream_filter(stream))
        return sorted({parse_event_subject(s)[2] for s in (info.state.subjects or {})})

    async def read(self, stream: str, key: str, after_seq: int = 0,
                   since: str | None = None) -> list[LoggedEvent]:
        """The instance's events after ``after_seq`` (or stored at or after time ``since``)."""
        messages = await read_all(self._nc, EVENTS_STREAM, instance_filter(stream, key),
                                  after_seq=after_seq, start_time=since)
        return [e for e in (_decode(m) for m in messages) if e is not None]

    async def append(self, stream: str, key: str, events: list[CloudEvent], *,
                     expected_last_seq: int, causation: str) -> list[int]:
        """Append all ``events`` or none, only if the instance's last event is ``expected_last_seq``.

        Raises ``WrongLastSequence`` when another writer appended first.
        """
        messages = [
            (event_subject(e.type, stream, key), e.to_json(),
             {CAUSATION: causation, "Nats-Msg-Id": f"{causation}:{i}"})
            for i, e in enumerate(events)
        ]
        guard = {
            "Nats-Expected-Last-Subject-Sequence": str(expected_last_seq),
            "Nats-Expected-Last-Subject-Sequence-Subject": instance_filter(stream, key),
        }
        return await publish_atomic(self._nc, messages, guard)

    async def publish_one(self, event: CloudEvent, key: str, msg_id: str, causation: str) -> int:
        """An event reported by a gateway: not guarded, deduplicated by ``msg_id``."""
        return await publish(self._nc, event_subject(event.type, event.stream, key), event.to_json(),
                             {CAUSATION: causation, "Nats-Msg-Id": msg_id})
