"""The consumer loop around fetches: what a fetch brings, or not, never ends it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from nats.errors import TimeoutError as NatsTimeout

import concordance_provider.workers.base as base
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


def test_a_gathering_consumer_waits_after_a_batch_that_emptied_its_queue_and_only_then() -> None:
    fetched_at: list[float] = []

    class TimedSubscription(FakeSubscription):
        async def fetch(self, batch: int, timeout: float) -> list:
            fetched_at.append(asyncio.get_running_loop().time())
            return await super().fetch(batch, timeout)

    async def dispatch(batch: list, stopping: asyncio.Event) -> None:
        pass

    async def scenario() -> None:
        stopping = asyncio.Event()
        # more waiting after the first batch; the second empties the queue; the third finds nothing
        sub = TimedSubscription([[message(1, 5)], [message(2, 0)], []], stopping)
        spec = ConsumerSpec("CC_EVENTS", "PROJ_bank", ("cc.events.>",), batch=10)
        await asyncio.wait_for(ConsumerLoop(FakeJetStream(sub), spec, dispatch, gather=0.2).run(stopping), 5)

    asyncio.run(scenario())
    assert len(fetched_at) == 4
    assert fetched_at[1] - fetched_at[0] < 0.1  # messages were waiting: fetched at once
    assert fetched_at[2] - fetched_at[1] >= 0.2  # the queue was empty: a trickle is gathered first
    assert fetched_at[3] - fetched_at[2] < 0.1  # an empty fetch is no batch: nothing to gather after


def test_a_consumer_whose_setup_meets_nats_away_is_set_up_once_it_answers(monkeypatch) -> None:
    # a daemon is ready before every consumer is set up: a server that goes away then must not
    # end the consumer (which takes the daemon down), only delay it
    monkeypatch.setattr(base, "SETUP_RETRY_SECONDS", 0.01)
    dispatched: list[list[int]] = []

    class AwayAtFirst(FakeJetStream):
        lookups = 0

        async def consumer_info(self, stream: str, durable: str) -> SimpleNamespace:
            self.lookups += 1
            if self.lookups <= 2:
                raise NatsTimeout()
            return await super().consumer_info(stream, durable)

    async def dispatch(batch: list, stopping: asyncio.Event) -> None:
        dispatched.append([m.metadata.sequence.stream for m in batch])

    async def scenario() -> AwayAtFirst:
        stopping = asyncio.Event()
        js = AwayAtFirst(FakeSubscription([[message(1, 0)]], stopping))
        spec = ConsumerSpec("CC_EVENTS", "NOTIFIER_bank", ("cc.events.>",), batch=10)
        await asyncio.wait_for(ConsumerLoop(js, spec, dispatch).run(stopping), 5)
        return js

    js = asyncio.run(scenario())
    assert js.lookups == 3
    assert dispatched == [[1]]
