"""An engine on the in-memory stores with the Python bank, and commands to give it."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from concordance_provider.engine.mapper import LoggedEvent, to_cloud_event, to_message
from concordance_provider.engine.memory import InMemoryEventLog, InMemoryStateStore
from concordance_provider.engine.processor import Command, CommandProcessor
from concordance_provider.engine.repository import AggregateRepository
from concordance_provider.naming import aggregate_state_key
from concordance_provider.runtime import Event
from concordance_provider.signing import Signer
from concordance_provider.wire import RawCommand

from .bank import STREAM, FakeBank, balance

NAME = "bank"
_seqs = itertools.count(1)


def command(command_type: str, key: str = "A", *, seq: int | None = None, redelivered: bool = False,
            stored_at: datetime | None = None, **data: object) -> Command:
    return Command(RawCommand(command_type=command_type, key=key, data=data),
                   next(_seqs) if seq is None else seq, redelivered, stored_at or datetime.now(timezone.utc))


@dataclass
class Engine:
    bank: FakeBank = field(default_factory=FakeBank)
    log: InMemoryEventLog = field(default_factory=InMemoryEventLog)
    states: InMemoryStateStore = field(default_factory=InMemoryStateStore)
    cache_size: int = 4096

    def __post_init__(self) -> None:
        self.repository = AggregateRepository(NAME, STREAM, self.bank, self.log, self.states, self.cache_size)
        self.processor = CommandProcessor(self.repository, self.bank)

    @classmethod
    def signed(cls, signer: Signer) -> "Engine":
        """An engine whose stores sign what they write with ``signer`` and check what they read."""
        return cls(log=InMemoryEventLog(signer=signer), states=InMemoryStateStore(signer=signer))

    def twin(self) -> "Engine":
        """Another daemon: same stores, its own component and cache."""
        return Engine(log=self.log, states=self.states)

    async def state(self, key: str = "A") -> tuple[int | None, int]:
        stored = await self.states.load(aggregate_state_key(NAME, key))
        return balance(stored.value), stored.event_seq

    async def events(self, key: str = "A") -> list[LoggedEvent]:
        return [event async for event in self.log.events(STREAM, key)]

    def append_directly(self, key: str, event_type: str, causation: str, **payload: object) -> int:
        """An event stored by someone else, with no state saved for it."""
        cloud = to_cloud_event(Event(event_type, STREAM, json.dumps(payload)), STREAM, key)
        message = to_message(cloud, key, causation, f"{causation}:0")
        return self.log.publish(message.subject, message.data, message.headers)
