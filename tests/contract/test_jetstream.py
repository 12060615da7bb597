"""The contract on the JetStream event log (CC_EVENTS) and state store (KV CC_STATE), against a real
nats-server with the streams the daemon creates."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import nats
import pytest
from integration.harness import nats_server
from nats.aio.client import Client as NATS

from concordance_provider.naming import COMMANDS_STREAM, command_subject
from concordance_provider.store.commands import CommandQueue
from concordance_provider.store.events import EventLog
from concordance_provider.store.results import ResultStore
from concordance_provider.store.jetstream import publish
from concordance_provider.signing import Signer
from concordance_provider.store.state import EVENT_SEQUENCE, StateStore
from concordance_provider.store.streams import ensure_all, ensure_bucket

from .rules import EventLogContract, ProcessorContract, SigningContract, StateStoreContract

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with nats_server(tmp_path_factory.mktemp("contract")) as running:
        yield running


@pytest.fixture(scope="module")
async def nc(server):
    client = await nats.connect(server.url)
    await ensure_all(client.jetstream())
    yield client
    await client.close()


@dataclass
class JetStreamBackend:
    nc: NATS
    signer: Signer | None = None

    def __post_init__(self) -> None:
        self.log = EventLog(self.nc, self.signer)
        self.states = StateStore(self.nc, signer=self.signer)
        self.max_payload = self.nc.max_payload

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
        return await publish(self.nc, subject, data, headers)

    def signed(self, signer: Signer) -> "JetStreamBackend":
        return JetStreamBackend(self.nc, signer)

    async def write_state(self, key: str, value: str, event_seq: int, headers: dict[str, str]) -> int:
        return await publish(self.nc, f"$KV.CC_STATE.{key}", value.encode(), {EVENT_SEQUENCE: str(event_seq), **headers})


class OnJetStream:
    @pytest.fixture
    def backend(self, nc) -> JetStreamBackend:
        return JetStreamBackend(nc)


class TestJetStreamEventLog(OnJetStream, EventLogContract):
    pass


class TestJetStreamStateStore(OnJetStream, StateStoreContract):
    pass


class TestProcessorOnJetStream(OnJetStream, ProcessorContract):
    pass


class TestSigningOnJetStream(OnJetStream, SigningContract):
    pass


async def test_outcomes_may_be_recorded_only_for_commands_stored_before_the_connection(nc: NATS) -> None:
    js = nc.jetstream()
    results = ResultStore(js, nc=nc)
    assert results.may_be_recorded(1)  # not looked yet: any command may have been decided
    stored = (await js.publish(command_subject("outcomes"), b"{}")).seq
    await results.connected()
    assert (await js.stream_info(COMMANDS_STREAM)).state.last_seq == stored
    assert results.may_be_recorded(stored)
    assert not results.may_be_recorded(stored + 1)  # stored after the look: never delivered before
    results.disconnected()
    assert results.may_be_recorded(stored + 1)


async def test_daemons_starting_at_once_each_find_the_bucket_one_of_them_made(server):
    # each makes the read-model bucket, then enables atomic writes on it: a daemon whose create
    # came second met "already in use with a different configuration" and exited
    clients = [await nats.connect(server.url) for _ in range(4)]
    try:
        for round_ in range(10):
            bucket = f"CC_RM_race_{round_}"
            await asyncio.gather(*(ensure_bucket(c.jetstream(), bucket, atomic=True) for c in clients))
            info = await clients[0].jetstream().stream_info(f"KV_{bucket}")
            assert info.config.allow_atomic and info.config.allow_direct
    finally:
        for c in clients:
            await c.close()


async def test_a_command_waits_in_place_while_the_earlier_ones_leave_and_no_longer_once_they_stop(nc: NATS) -> None:
    js = nc.jetstream()
    queue = CommandQueue("patience")
    queue._nc = nc  # as must_wait sets it from the batch's connection
    earlier = [(await js.publish(command_subject("patience", "K"), b"{}")).seq for _ in range(3)]

    async def decided_one_by_one(pause: float) -> None:
        for seq in earlier:
            await asyncio.sleep(pause)
            await js.delete_msg(COMMANDS_STREAM, seq)

    deciding = asyncio.create_task(decided_one_by_one(0.3))
    started = time.monotonic()
    assert await queue.finished(earlier, 0.5)  # each leaves within 0.5 s of the last: 0.9 s in all
    assert time.monotonic() - started >= 0.85
    await deciding

    stuck = [(await js.publish(command_subject("patience", "K"), b"{}")).seq for _ in range(2)]
    started = time.monotonic()
    assert not await queue.finished(stuck, 0.5)  # nothing leaves: its holder died, say
    assert 0.4 <= time.monotonic() - started < 2.0
