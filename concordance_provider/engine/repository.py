"""An aggregate instance's state: current with its log, saved under its guard, rebuilt from scratch.

Stored state records the last event folded into it; loading folds in any later event of the
instance (catch-up), so a command is never decided on stale state and no event is folded twice.

The state of recently used instances is also kept in memory (least recently used dropped first).
It is trusted only as far as the log's guard allows: an append expecting a last sequence that is no
longer the instance's last is refused, the entry is dropped, and the command is decided again on
state read from the store and the log. A stale entry costs a retry, never a wrong decision.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, defaultdict
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import AsyncIterator, Hashable, Sequence

from ..naming import aggregate_state_key
from ..runtime import Component, ComponentFailed
from ..signing import Signer
from .mapper import EventMessage, LoggedEvent, to_component
from .persistence import EventLog, StateConflict, StateStore

MAX_REBUILD_ATTEMPTS = 25
MAX_SAVE_ATTEMPTS = 5
DEFAULT_CACHE_SIZE = 4096  # instances whose state is kept in memory


@dataclass(frozen=True)
class CurrentState:
    value: str | None
    event_seq: int  # the instance's last message in the log: what the next append expects
    saved_seq: int  # the last event in the stored state
    revision: int  # the stored state's revision: what the next save expects

    @property
    def behind(self) -> bool:
        """The stored state misses events that are folded into ``value``."""
        return self.event_seq > self.saved_seq


class KeyedLocks:
    """One lock per key, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._users: dict[Hashable, int] = defaultdict(int)

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]


class AggregateRepository:
    """The instances of one aggregate. Methods named "the caller holds the key" expect to run
    inside ``hold(key)``; the others take it themselves."""

    def __init__(self, name: str, stream: str, component: Component, log: EventLog, states: StateStore,
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.name = name
        self.stream = stream
        self._component = component
        self._log = log
        self._states = states
        self._locks = KeyedLocks()
        self._cache: OrderedDict[str, CurrentState] = OrderedDict()
        self._cache_size = cache_size

    @property
    def signer(self) -> Signer | None:
        """The key the log signs and checks events with, for those who check them as delivered."""
        return self._log.signer

    def hold(self, key: str) -> AbstractAsyncContextManager[None]:
        """This instance to the caller alone, within this process."""
        return self._locks.hold(key)

    def _state_key(self, key: str) -> str:
        return aggregate_state_key(self.name, key)

    # -- the cache -------------------------------------------------------------------------------

    def _remember(self, key: str, state: CurrentState) -> None:
        self._cache[key] = state
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)

    def cached(self, key: str) -> CurrentState | None:
        return self._cache.get(key)

    # -- reading ---------------------------------------------------------------------------------

    async def current(self, key: str) -> CurrentState:
        """The instance's state with every event of its log folded in (the caller holds the key)."""
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        stored, log_last = await asyncio.gather(self._states.load(self._state_key(key)),
                                                self._log.last_seq(self.stream, key))
        value, folded = stored.value, stored.event_seq
        if log_last > stored.event_seq:
            async for event in self._log.events(self.stream, key, after_seq=stored.event_seq):
                value = await self._component.apply_event(to_component(event), value)
                folded = event.seq
        # the next append expects the instance's last message, even one left out of the fold for
        # not being an event
        state = CurrentState(value, max(log_last, folded), stored.event_seq, stored.revision)
        self._remember(key, state)
        return state

    async def caused_by(self, key: str, causation: str, since: datetime) -> list[LoggedEvent]:
        return await self._log.caused_by(self.stream, key, causation, since)

    async def keys(self) -> list[str]:
        """Every key of this aggregate that has events."""
        return await self._log.keys(self.stream)

    # -- writing ---------------------------------------------------------------------------------

    async def append(self, key: str, current: CurrentState, messages: Sequence[EventMessage]) -> list[int]:
        """Append after ``current`` or not at all (the caller holds the key)."""
        try:
            return await self._log.append(self.stream, key, messages, expected_last_seq=current.event_seq)
        except BaseException:
            self.forget(key)  # someone appended first, or an outage left it unknown what is stored
            raise

    async def save(self, key: str, current: CurrentState, value: str | None, event_seq: int) -> None:
        """Store ``value`` as the state after ``event_seq``, unless the store already holds a state
        as new or newer (the caller holds the key)."""
        revision = current.revision
        try:
            for _attempt in range(MAX_SAVE_ATTEMPTS):
                try:
                    revision = await self._states.save(self._state_key(key), value, event_seq, revision)
                except StateConflict:  # another writer (a daemon catching up, a rebuild) came first
                    stored = await self._states.load(self._state_key(key))
                    if stored.event_seq >= event_seq:
                        self.forget(key)
                        return
                    revision = stored.revision
                    continue
                self._remember(key, CurrentState(value, event_seq, event_seq, revision))
                return
        except BaseException:
            self.forget(key)
            raise
        self.forget(key)  # readers catch up from the log

    async def save_if_behind(self, key: str, current: CurrentState) -> None:
        if current.behind:
            await self.save(key, current, current.value, current.event_seq)

    async def catch_up(self, key: str, event_seq: int) -> None:
        """Bring stored state up to the event ``event_seq``, if a crash left it behind."""
        cached = self._cache.get(key)
        if cached is not None and cached.saved_seq >= event_seq:
            return  # stored by this repository
        stored = await self._states.load(self._state_key(key))
        if stored.event_seq >= event_seq:
            return
        async with self.hold(key):
            cached = self._cache.get(key)
            if cached is not None and cached.event_seq < event_seq:
                self.forget(key)  # the log has moved on without this repository
            await self.save_if_behind(key, await self.current(key))

    async def rebuild(self, key: str) -> str | None:
        """Fold the instance's whole log, a page at a time, and store the result."""
        async with self.hold(key):
            self.forget(key)
            for _attempt in range(MAX_REBUILD_ATTEMPTS):
                stored = await self._states.load(self._state_key(key))
                log_last = await self._log.last_seq(self.stream, key)
                value, folded = None, 0
                async for event in self._log.events(self.stream, key):
                    value = await self._component.apply_event(to_component(event), value)
                    folded = event.seq
                try:
                    await self._states.save(self._state_key(key), value, max(log_last, folded), stored.revision)
                    return value
                except StateConflict:
                    continue  # a command landed meanwhile: fold again
        raise ComponentFailed(f"state of {key!r} kept changing during the rebuild")
