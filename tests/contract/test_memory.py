"""The contract on the in-memory event log and state store."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from concordance_provider.engine.memory import InMemoryEventLog, InMemoryStateStore

from .rules import EventLogContract, ProcessorContract, StateStoreContract


@dataclass
class MemoryBackend:
    log: InMemoryEventLog = field(default_factory=InMemoryEventLog)
    states: InMemoryStateStore = field(default_factory=InMemoryStateStore)

    @property
    def max_payload(self) -> int:
        return self.log.max_payload

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
        return self.log.publish(subject, data, headers)


class InMemory:
    @pytest.fixture
    def backend(self) -> MemoryBackend:
        return MemoryBackend()


class TestInMemoryEventLog(InMemory, EventLogContract):
    pass


class TestInMemoryStateStore(InMemory, StateStoreContract):
    pass


class TestProcessorOnInMemoryStores(InMemory, ProcessorContract):
    pass
