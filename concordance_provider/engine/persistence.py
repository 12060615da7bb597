"""What the engine needs from storage: an event log and a state store, as interfaces.

Each has two implementations, JetStream (``store.events``, ``store.state``) and in memory
(``engine.memory``), held to the same rules by one contract suite (``tests/contract``):

- an append names the sequence it expects the instance's last message to have, and stores all of
  its messages or none;
- a message id already stored makes the whole append a duplicate: nothing is stored;
- a state write names the revision it expects; the first write of a key expects revision 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import AsyncIterator, Protocol, Sequence

from .mapper import EventMessage, LoggedEvent


class Conflict(Exception):
    """A guarded write found that someone else wrote first."""


class AppendConflict(Conflict):
    """The instance's last message is not the one the append expected."""


class StateConflict(Conflict):
    """The state was written since the revision the write expected."""


class AlreadyAppended(Exception):
    """An append carried a message id the log already holds: nothing was stored."""


class EventTooLarge(ValueError):
    """An event bigger than the log's maximum message size: it can never be stored."""


@dataclass(frozen=True)
class StoredState:
    value: str | None
    event_seq: int  # last event folded in; 0 for none
    revision: int  # guards the next write; 0 if the key was never written


class EventLog(Protocol):
    """Every aggregate instance's events, in one sequence shared by all of them."""

    async def last_seq(self, stream: str, key: str) -> int:
        """Sequence of the instance's last message (event or not), 0 if it has none."""
        ...

    async def keys(self, stream: str) -> list[str]:
        """Every key of ``stream`` that has messages, sorted."""
        ...

    def events(self, stream: str, key: str, after_seq: int = 0) -> AsyncIterator[LoggedEvent]:
        """The instance's events after ``after_seq``, in order, read a page at a time; messages that
        are not events are left out (and logged)."""
        ...

    async def caused_by(self, stream: str, key: str, causation: str, since: datetime) -> list[LoggedEvent]:
        """The instance's events stored at or after ``since`` whose causation is ``causation``."""
        ...

    async def append(self, stream: str, key: str, messages: Sequence[EventMessage], *,
                     expected_last_seq: int) -> list[int]:
        """Store all ``messages`` or none, only if the instance's last message is
        ``expected_last_seq``; return their sequences. Raises AppendConflict, AlreadyAppended or
        EventTooLarge, each with nothing stored."""
        ...


class StateStore(Protocol):
    """The latest state of each aggregate instance or process, by key."""

    async def load(self, key: str) -> StoredState:
        ...

    async def save(self, key: str, value: str | None, event_seq: int, revision: int) -> int:
        """Write (or delete, for None) if the key's revision is still ``revision``; return the new
        revision. Raises StateConflict otherwise."""
        ...
