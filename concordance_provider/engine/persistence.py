"""What the engine needs from storage: an event log and a state store, as interfaces.

Each has two implementations, JetStream (``store.events``, ``store.state``) and in memory
(``engine.memory``), held to the same rules by one contract suite (``tests/contract``):

- an append names the sequence it expects the instance's last message to have, and stores all of
  its messages or none;
- a message id already stored makes the whole append a duplicate: nothing is stored;
- a state write names the revision it expects; the first write of a key expects revision 0;
- with a signing key (``signing``), each appended event is signed with its place in the append
  (``mapper.signed_append``) and each state record with its key and event sequence; a read leaves
  out an event that does not verify or stands elsewhere than it was appended
  (``mapper.InstanceEvents``), and takes a state record that does not verify for no state
  (``verified_state``), so that it is folded again from the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import AsyncIterator, Protocol, Sequence

import structlog

from ..signing import Signer
from .mapper import EventMessage, LoggedEvent

log = structlog.get_logger(__name__)


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


def verified_state(signer: Signer | None, key: str, state: StoredState, signature: str | None) -> StoredState:
    """``state`` as read, or, with a key, no state (at the same revision, which guards the next
    write) if its signature does not hold: what it claims is folded again from the log."""
    if signer is None or signer.state_is_genuine(key, state.value, state.event_seq, signature):
        return state
    log.error("forged state record; ignored, the state is folded from the log", key=key,
              revision=state.revision, claimed_event_seq=state.event_seq)
    return StoredState(None, 0, state.revision)


class EventLog(Protocol):
    """Every aggregate instance's events, in one sequence shared by all of them."""

    signer: Signer | None  # signs what is appended and checks what is read; None: no key

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
