"""The consumer loop around fetches: what a fetch brings, or not, never ends it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from concordance_provider.workers.base import ConsumerLoop, ConsumerSpec


class FakeInbox:
    _id = 1

    async def next_msg(self, timeout: float) -> None:
        await asyncio.sleep(0)
        raise asyncio.TimeoutError

    async def unsubscribe(self) -> None:
        pass


class FakeConnection:
    async def _send_unsubscribe(self, sid: int) -> None:
        pass

    async def flush(self, timeout: float) -> None:
        pass


class FakeSubscription:
    """Fetches that bring what ``results`` say: a list, or an exception to raise."""

    def __init__(self, results: list, stopping: asyncio.Event) -> None:
        self._results = results
        self._stopping = stopping
        self._sub, self._nc = FakeInbox(), FakeConnection()

    async def fetch(self, batch: int, timeout: float) -> list:
        if not self._results:
            self._stopping.set()
            raise asyncio.TimeoutError
        result = self._results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


class FakeJetStream:
    def __init__(self, sub: FakeSubscription) -> None:
        self._sub = sub

    async def consumer_info(self, stream: str, durable: str) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(deliver_policy=None, opt_start_seq=None, opt_start_time=None))

    async def add_consumer(self, stream: str, config: object) -> None:
        pass

    async def pull_subscribe_bind(self, durable: str, stream: str) -> FakeSubscription:
        return self._sub


def message(seq: int, pending: int) -> SimpleNamespace:
    async def ack() -> None:
        pass

    return SimpleNamespace(metadata=SimpleNamespace(sequence=SimpleNamespace(stream=seq, consumer=seq),
                                                    num_pending=pending, num_delivered=1),
                           is_acked=False, ack=ack)


def test_an_empty_fetch_is_fetched_again_with_batches_overlapping_or_not() -> None:
    for overlap in (1, 2):
        dispatched: list[list[int]] = []

        async def dispatch(batch: list, stopping: asyncio.Event) -> None:
            dispatched.append([m.metadata.sequence.stream for m in batch])

        async def scenario() -> None:
            stopping = asyncio.Event()
            sub = FakeSubscription([[message(1, 2)], [], [message(2, 1), message(3, 0)], []], stopping)
            spec = ConsumerSpec("CC_COMMANDS", "AGG_CMD_bank", ("cc.commands.bank",), batch=10)
            await asyncio.wait_for(ConsumerLoop(FakeJetStream(sub), spec, dispatch, overlap=overlap).run(stopping), 5)

        asyncio.run(scenario())
        assert dispatched == [[1], [2, 3]], overlap
