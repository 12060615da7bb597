"""The event log and state store in memory, with the same guards as JetStream's.

For tests of the engine's rules (milliseconds each, no server), and as the reference the contract
suite holds the JetStream implementations to. Like JetStream, the log keeps one sequence for every
instance, guards an append by the instance's last message, and drops a second message with the
same id; the state store guards each write by the key's revision. With a signing key, both sign
what they write and leave out what does not verify, as the JetStream stores do.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import AsyncIterator, Sequence

from ..naming import EVENT_PREFIX
from ..signing import SIGNATURE, Signer
from .mapper import CAUSATION, MESSAGE_ID, EventMessage, InstanceEvents, LoggedEvent, logged_event, signed_append
from .persistence import AlreadyAppended, AppendConflict, EventTooLarge, StateConflict, StoredState, verified_state

NATS_MAX_PAYLOAD = 1024 * 1024  # the NATS server's default


@dataclass(frozen=True)
class StoredMessage:
    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes
    time: datetime


def _instance(subject: str) -> tuple[str, str] | None:
    """The (stream, key) whose guard and reads cover ``subject``: the instance filter
    ``cc.events.*.{stream}.{key}`` matches exactly five tokens."""
    parts = subject.split(".")
    if len(parts) == 5 and f"{parts[0]}.{parts[1]}" == EVENT_PREFIX:
        return parts[3], parts[4]
    return None


@dataclass
class InMemoryEventLog:
    max_payload: int = NATS_MAX_PAYLOAD
    signer: Signer | None = None
    messages: list[StoredMessage] = field(default_factory=list)
    _instances: dict[tuple[str, str], list[StoredMessage]] = field(default_factory=lambda: defaultdict(list))
    _message_ids: set[str] = field(default_factory=set)
    last_seq_reads: int = 0

    def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
        """Store one message without a guard, as anyone may publish on ``cc.events.>``."""
        stored = StoredMessage(len(self.messages) + 1, subject, dict(headers or {}), data, datetime.now(timezone.utc))
        self.messages.append(stored)
        instance = _instance(subject)
        if instance is not None:
            self._instances[instance].append(stored)
        if MESSAGE_ID in stored.headers:
            self._message_ids.add(stored.headers[MESSAGE_ID])
        return stored.seq

    async def last_seq(self, stream: str, key: str) -> int:
        self.last_seq_reads += 1
        found = self._instances.get((stream, key))
        return found[-1].seq if found else 0

    async def keys(self, stream: str) -> list[str]:
        return sorted(key for (each, key), found in self._instances.items() if each == stream and found)

    async def events(self, stream: str, key: str, after_seq: int = 0) -> AsyncIterator[LoggedEvent]:
        found = self._instances.get((stream, key), [])
        reading = InstanceEvents(self.signer, after_seq)
        index = 0
        while index < len(found):  # events appended while reading are read too, as from JetStream
            stored = found[index]
            index += 1
            if stored.seq > after_seq and (event := reading.event(stored)) is not None:
                yield event

    async def caused_by(self, stream: str, key: str, causation: str, since: datetime) -> list[LoggedEvent]:
        found = [m for m in self._instances.get((stream, key), [])
                 if m.headers.get(CAUSATION) == causation and m.time >= since]
        return [event for m in found if (event := logged_event(m, self.signer)) is not None]

    async def append(self, stream: str, key: str, messages: Sequence[EventMessage], *,
                     expected_last_seq: int) -> list[int]:
        for message in messages:
            if len(message.data) > self.max_payload:
                raise EventTooLarge(f"{message.subject}: {len(message.data)} bytes is over the maximum "
                                    f"payload of {self.max_payload}")
        found = self._instances.get((stream, key))
        last = found[-1].seq if found else 0
        if last != expected_last_seq:
            raise AppendConflict(f"wrong last sequence: {last}")
        if any(m.headers.get(MESSAGE_ID) in self._message_ids for m in messages):
            raise AlreadyAppended(f"{stream}.{key}: a message id is already stored")
        return [self.publish(m.subject, m.data, m.headers)
                for m in signed_append(messages, self.signer, expected_last_seq)]


@dataclass
class InMemoryStateStore:
    signer: Signer | None = None
    _entries: dict[str, tuple[StoredState, dict[str, str]]] = field(default_factory=dict)  # with headers
    _last_revision: int = 0  # one sequence for every key, as a KV bucket's stream has
    loads: int = 0
    writes: int = 0

    async def load(self, key: str) -> StoredState:
        self.loads += 1
        found = self._entries.get(key)
        if found is None:
            return StoredState(None, 0, 0)
        state, headers = found
        return verified_state(self.signer, key, state, headers.get(SIGNATURE))

    async def save(self, key: str, value: str | None, event_seq: int, revision: int) -> int:
        current = self._entries.get(key)
        last = current[0].revision if current else 0
        if last != revision:
            raise StateConflict(f"{key}: wrong last sequence: {last}")
        headers = {} if self.signer is None else {SIGNATURE: self.signer.sign_state(key, value, event_seq)}
        self.writes += 1
        return self.write(key, value, event_seq, headers)

    def write(self, key: str, value: str | None, event_seq: int, headers: dict[str, str] | None = None) -> int:
        """Store a record without a guard, as anyone may write to the bucket; return its revision."""
        self._last_revision += 1
        self._entries[key] = (StoredState(value, event_seq, self._last_revision), dict(headers or {}))
        return self._last_revision
