"""Load shapes against the daemon, through the public wire only, and the projector's lag meanwhile.

* closed loop: N clients, each sends a deposit, waits for its outcome in CC_RESULTS, sends the next;
* one at a time: the same with one client (the round trip of one command at low load);
* open loop: deposits arriving at a fixed rate whatever the daemon's pace, each timed from the moment
  it was due, so a daemon that falls behind is charged for the queue it builds;
* projector lag: how far the checkpoint in KV CC_RM_bankaccount_projector trails the event log.
"""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from benchmarks.wire import AGGREGATE, PUBLISH_TIMEOUT, BenchFailed, Outcomes, deposit
from concordance_provider.naming import EVENTS_STREAM, command_subject

PROJECTOR = "bankaccount_projector"
READ_MODEL_BUCKET = f"CC_RM_{PROJECTOR}"
CHECKPOINT_KEY = f"_cc.checkpoint.PROJ_{PROJECTOR}"  # value: the last event sequence applied
LAG_SAMPLE_SECONDS = 0.1


def settle_heap() -> None:
    """Before a timed latency phase, on either side: a full collection now, and everything so far
    kept out of later ones. This process's own full passes (25 ms each once it holds a run's
    outcomes) would otherwise be charged to whichever system it was timing."""
    gc.collect()
    gc.freeze()


@dataclass
class LoadRun:
    count: int
    seconds: float  # from the first send until the last outcome
    latencies: list[float]  # seconds per command

    @property
    def rate(self) -> float:
        return self.count / self.seconds


async def closed_loop(js: JetStreamContext, outcomes: Outcomes, plan: list[tuple[str, int]], in_flight: int,
                      timeout: float, note: str) -> LoadRun:
    """Every deposit of ``plan`` with ``in_flight`` clients, each waiting for its outcome before the next."""
    todo = iter(enumerate(plan))
    latencies = [0.0] * len(plan)
    seqs: list[int] = []
    deadline = time.perf_counter() + timeout

    async def client() -> None:
        for index, (key, amount) in todo:  # a shared iterator: each deposit goes to exactly one client
            sent = time.perf_counter()
            ack = await js.publish(command_subject(AGGREGATE), deposit(key, amount, f"{note} {index}"),
                                   timeout=PUBLISH_TIMEOUT)
            seqs.append(ack.seq)
            latencies[index] = await outcomes.arrival(ack.seq, max(deadline - time.perf_counter(), 0.1)) - sent

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(in_flight, len(plan)))))
    elapsed = time.perf_counter() - started
    outcomes.check_accepted(seqs, f"{note} deposits")
    return LoadRun(len(plan), elapsed, latencies)


async def one_at_a_time(js: JetStreamContext, outcomes: Outcomes, key: str, count: int, timeout: float,
                        note: str) -> list[float]:
    """``count`` deposits on ``key``, each sent once the previous one's outcome is in; seconds each."""
    run = await closed_loop(js, outcomes, [(key, 1)] * count, 1, timeout, note)
    return run.latencies


async def open_loop(js: JetStreamContext, outcomes: Outcomes, keys: list[str], rate: float, seconds: float,
                    timeout: float, note: str) -> LoadRun:
    """Deposits due every 1/``rate`` s for ``seconds``, round-robin over ``keys``; each timed from when it was due."""
    count = max(1, round(rate * seconds))
    latencies = [0.0] * count
    seqs = [0] * count

    async def one(index: int, due: float) -> None:
        key = keys[index % len(keys)]
        ack = await js.publish(command_subject(AGGREGATE), deposit(key, 1 + index % 97, f"{note} {index}"),
                               timeout=PUBLISH_TIMEOUT)
        seqs[index] = ack.seq
        latencies[index] = await outcomes.arrival(ack.seq, timeout) - due

    started = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    try:
        for index in range(count):
            due = started + index / rate
            if (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, due)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    elapsed = time.perf_counter() - started
    outcomes.check_accepted(seqs, f"{note} deposits")
    return LoadRun(count, elapsed, latencies)


def done_within(run: LoadRun, rate: float, seconds: float) -> float:
    """Outcomes per second that came while an open loop at ``rate`` was still sending (its first
    ``seconds``): what the daemon did with the load generator running beside it, not counting the
    queue it drained afterwards alone."""
    done = sum(1 for index, latency in enumerate(run.latencies) if index / rate + latency <= seconds)
    return done / seconds


@dataclass
class LagSample:
    at: float  # perf_counter
    last_event: int  # last sequence in CC_EVENTS
    applied: int  # the projector's checkpoint

    @property
    def behind(self) -> int:
        return max(self.last_event - self.applied, 0)


class ProjectorLag:
    """Samples the projector's checkpoint against the event log every ``LAG_SAMPLE_SECONDS``."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.samples: list[LagSample] = []
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._kv is None:
            try:
                self._kv = await self.js.key_value(READ_MODEL_BUCKET)
            except (BucketNotFoundError, NotFoundError, NatsTimeout):
                if time.monotonic() > deadline:
                    raise BenchFailed(f"no read model bucket {READ_MODEL_BUCKET} after {timeout:.0f}s") from None
                await asyncio.sleep(LAG_SAMPLE_SECONDS)
        self._task = asyncio.create_task(self._run())

    async def sample(self) -> LagSample:
        assert self._kv is not None
        last_event = (await self.js.stream_info(EVENTS_STREAM)).state.last_seq
        try:
            applied = int((await self._kv.get(CHECKPOINT_KEY)).value or b"0")
        except KeyNotFoundError:
            applied = 0
        return LagSample(time.perf_counter(), last_event, applied)

    async def _run(self) -> None:
        while True:
            try:
                self.samples.append(await self.sample())
            except NatsTimeout:
                pass  # a slow answer under load: the next sample will do
            await asyncio.sleep(LAG_SAMPLE_SECONDS)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def applied_per_second(self, seconds: float, attempts: int = 5) -> float:
        """Events the projector applies per second over the next ``seconds``: its checkpoint read
        now and again once they have passed."""
        first = await self._sample_within(attempts)
        await asyncio.sleep(max(seconds - (time.perf_counter() - first.at), 0.0))
        last = await self._sample_within(attempts)
        return (last.applied - first.applied) / (last.at - first.at)

    async def _sample_within(self, attempts: int) -> LagSample:
        for _ in range(attempts - 1):
            try:
                return await self.sample()
            except NatsTimeout:
                continue  # a slow answer under load: ask again
        return await self.sample()

    def max_behind(self, since: float, until: float) -> int:
        """The most events the projector trailed the log by, among samples taken in [since, until]."""
        return max((s.behind for s in self.samples if since <= s.at <= until), default=0)

    async def catch_up(self, since: float, timeout: float) -> float | None:
        """Seconds from ``since`` (perf_counter) until the checkpoint reaches the log's last event as of
        now; None if that takes longer than ``timeout``."""
        target: int | None = None
        while time.perf_counter() - since < timeout:
            try:
                sample = await self.sample()
            except NatsTimeout:
                continue  # a slow answer under load: ask again
            target = sample.last_event if target is None else target
            if sample.applied >= target:
                return time.perf_counter() - since
            await asyncio.sleep(LAG_SAMPLE_SECONDS / 5)
        return None
