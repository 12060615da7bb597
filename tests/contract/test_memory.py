"""The contract on the in-memory event log and state store."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from concordance_provider.engine.memory import InMemoryEventLog, InMemoryStateStore

from concordance_provider.signing import Signer

from .rules import EventLogContract, ProcessorContract, SigningContract, StateStoreContract


@dataclass
class MemoryBackend:
    log: InMemoryEventLog = field(default_factory=InMemoryEventLog)
    states: InMemoryStateStore = field(default_factory=InMemoryStateStore)

    @property
    def max_payload(self) -> int:
        return self.log.max_payload

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
        return self.log.publish(subject, data, headers)

    def signed(self, signer: Signer) -> "MemoryBackend":
        return MemoryBackend(InMemoryEventLog(signer=signer, messages=self.log.messages,
                                              _instances=self.log._instances, _message_ids=self.log._message_ids),
                             InMemoryStateStore(signer=signer, _entries=self.states._entries))

    async def write_state(self, key: str, value: str, event_seq: int, headers: dict[str, str]) -> int:
        return self.states.write(key, value, event_seq, headers)


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


class TestSigningOnInMemoryStores(InMemory, SigningContract):
    pass
