"""End-to-end command throughput and latency of Concordance, against raw JetStream and pyeventsourcing.

What it measures, in one run against its own loopback nats-server and daemon:

* raw:   JetStream publishes with request/ack into a plain file stream (BENCH_RAW) -- the
         ceiling any command path through JetStream can reach on this machine;
* e2e:   deposit commands spread over many accounts, timed from the first send until every
         command's outcome is in KV CC_RESULTS (all must be accepted, balances must add up),
         while the projector's lag behind the event log is sampled;
* 1 key: deposits on a single account, where the daemon must handle them one after another;
* in flight: commands/s with 1 to 64 clients that each wait for their command's outcome;
* low load: one command at a time, from the send until its outcome is in CC_RESULTS;
* capacity: the highest rate the daemon sustains end to end with the load generator beside it on
         the same cores (the e2e rate drains a queue sent beforehand, with no client running):
         open-loop arrivals, each run as long as the 80 % run, first above the e2e rate, then from
         what was decided there down in steps, until the outcomes and the projector's read model
         both keep pace with the arrivals while they are sent;
* 80 %:  open-loop arrivals at 0.8 x that capacity over many accounts, for a bounded time (and, for
         comparison, at 0.8 x the e2e rate);
* history: one at a time on an account with a long history against a fresh one.

The peer is pyeventsourcing with its SQLite recorder on a file (benchmarks/peer.py), on the same
deposits with the same concurrency, measured in the same run on the same machine. Then every
target is printed with its measured value, and a PNG plot is written.

Absolute rates depend on the machine and whatever else runs on it, so the figures to quote are
the ratios within one run: e2e / raw and daemon / pyeventsourcing.

Run: ``.venv/bin/python -m benchmarks.bench [--commands N --keys K ...]`` from the project root.
Exits non-zero if any command is lost, rejected or late, or a balance is wrong; a target that is
not met is reported, and the exit status is still 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Awaitable

import nats
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from benchmarks import load, peer, plot, targets
from benchmarks.wire import (  # noqa: F401  (re-exported: benchmarks.lattice imports them from here)
    AGGREGATE,
    MANIFEST,
    PUBLISH_TIMEOUT,
    ROOT,
    INITIAL_BALANCE,
    BenchFailed,
    Outcomes,
    check_balances,
    create_account,
    deposit,
    deposit_plan,
    expected_balances,
    logged_events,
    poll_until,
    publish_all,
    start_daemon,
    stop_daemon,
    tail,
)
from concordance_provider.logging import configure as configure_logging
from concordance_provider.naming import COMMANDS_STREAM, RESULTS_BUCKET, STATE_BUCKET, command_subject
from concordance_provider.nats_server import EmbeddedNatsServer, free_port
from concordance_provider.store.results import read_result

RAW_STREAM, RAW_SUBJECT = "BENCH_RAW", "bench.raw"
DEFAULT_PLOT = ROOT / "benchmarks" / "results" / "bench.png"
CATCH_UP_BOUND = 60.0  # seconds the projector is given to be current after the last command
OVERLOAD = 1.3  # the capacity run's arrivals, times the e2e rate: more than the daemon can take
# The capacity search: after that run, rates from what it decided then, down by STEP (at most STEPS
# more runs), until the outcomes and the read model keep pace with the arrivals while they are sent:
# at least DECIDED_PACE and PROJECTED_PACE of them, 0.1 s and 0.3 s behind at the end of a 10 s run
# (the projector trails the log by 0.1-0.3 s even when it keeps up; a queue that grows, by more)
CAPACITY_STEP, CAPACITY_STEPS, DECIDED_PACE, PROJECTED_PACE = 0.93, 4, 0.99, 0.97
STARTED = time.monotonic()


def progress(what: str) -> None:
    """A line on stderr as each phase starts, so a slow machine shows where the time goes."""
    print(f"bench [{time.monotonic() - STARTED:4.0f}s] {what}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Options:
    raw_messages: int
    commands: int
    keys: int
    single_key_commands: int
    concurrency: int
    ready_timeout: float
    phase_timeout: float
    overall_timeout: float
    round_trips: int = 200
    in_flight: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    in_flight_commands: int = 240
    load_seconds: float = 10.0
    history_events: int = 5000
    history_rounds: int = 40
    plot_path: Path = DEFAULT_PLOT
    one_process: bool = False  # the daemon without --stateless-process

    @property
    def daemon_options(self) -> tuple[str, ...]:
        return () if self.one_process else ("--stateless-process",)


@dataclass(frozen=True)
class Measurement:
    label: str
    count: int
    send_seconds: float  # until the last JetStream ack
    total_seconds: float  # until the last outcome (raw: same as send_seconds)

    @property
    def rate(self) -> float:
        return self.count / self.total_seconds


@dataclass
class Side:
    """One system's figures: the daemon's or pyeventsourcing's."""

    name: str
    multi: float = 0.0  # commands/s over many keys
    single: float = 0.0  # commands/s on one key
    in_flight: dict[int, float] = field(default_factory=dict)  # commands/s by clients waiting for outcomes
    low_load: list[float] = field(default_factory=list)  # seconds per command, one at a time
    fresh: list[float] = field(default_factory=list)  # one at a time on a fresh key
    history: list[float] = field(default_factory=list)  # one at a time on a key with a long history
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Offered:
    """An open loop at ``rate`` commands/s: per second while it was sending, the commands decided
    and the events (one per deposit) the projector applied."""

    rate: float
    decided: float
    projected: float

    @property
    def kept_pace(self) -> bool:
        return self.decided >= DECIDED_PACE * self.rate and self.projected >= PROJECTED_PACE * self.rate


@dataclass(frozen=True)
class Capacity:
    """The steps of the search for the highest rate the daemon sustains end to end."""

    steps: tuple[Offered, ...]

    @property
    def rate(self) -> float:
        """The highest rate offered at which commands and the read model kept pace; if none did,
        what the slower of the two did at the last."""
        kept = [step.rate for step in self.steps if step.kept_pace]
        last = self.steps[-1]
        return max(kept) if kept else min(last.decided, last.projected)


@dataclass
class DaemonExtras:
    raw: Measurement
    multi: Measurement
    single: Measurement
    ready_s: float
    capacity: Capacity  # under an open loop above multi's rate
    loaded: load.LoadRun  # open loop at a fraction of capacity's rate
    loaded_on_drain: load.LoadRun  # open loop at that fraction of multi's rate
    lag_behind: int  # most events the projector trailed the log by during multi
    catch_up_s: float | None  # from multi's last outcome until the projector was current
    history_seed_s: float

    @property
    def loaded_rate(self) -> float:
        return targets.LOAD_FRACTION * self.capacity.rate


# -- the daemon ------------------------------------------------------------------------------------

async def run_commands(js: JetStreamContext, outcomes: Outcomes, bodies: list[bytes],
                       opts: Options, what: str) -> tuple[list[int], float, float]:
    """Send, wait for all outcomes, check all accepted; returns (seqs, send_s, total_s)."""
    start = time.perf_counter()
    seqs = await publish_all(js, command_subject(AGGREGATE), bodies, opts.concurrency)
    sent = time.perf_counter()
    await outcomes.wait_for(seqs, opts.phase_timeout)
    done = time.perf_counter()
    outcomes.check_accepted(seqs, what)
    return seqs, sent - start, done - start


async def wait_until_ready(nc: NATS, daemon: subprocess.Popen[bytes], opts: Options, tag: str) -> float:
    """Streams, buckets and the command consumer exist, and a probe command is accepted."""
    start = time.perf_counter()
    js = nc.jetstream()

    async def infrastructure() -> bool:
        try:
            await js.stream_info(COMMANDS_STREAM)
            await js.consumer_info(COMMANDS_STREAM, f"AGG_CMD_{AGGREGATE}")
            await js.key_value(RESULTS_BUCKET)
            await js.key_value(STATE_BUCKET)
            return True
        except (NotFoundError, NatsTimeout, NoRespondersError):
            return False

    await poll_until(infrastructure, opts.ready_timeout, "the daemon's streams and consumers", daemon)
    probe = f"probe-{tag}"
    ack = await js.publish(command_subject(AGGREGATE), create_account(probe), timeout=PUBLISH_TIMEOUT)

    async def probe_done() -> bool:
        value = await read_result(nc, ack.seq, aggregate=AGGREGATE, key=probe)
        if value is None:
            return False
        status = json.loads(value).get("status")
        if status != "accepted":
            raise BenchFailed(f"the probe command was {status}: {value!r}")
        return True

    left = max(opts.ready_timeout - (time.perf_counter() - start), 1.0)
    await poll_until(probe_done, left, "the probe command's outcome", daemon)
    return time.perf_counter() - start


async def measure_raw(js: JetStreamContext, opts: Options, body_size: int) -> Measurement:
    await js.add_stream(StreamConfig(name=RAW_STREAM, subjects=[RAW_SUBJECT], storage=StorageType.FILE))
    body = b"x" * body_size  # the size of a deposit command, so both sides move the same bytes
    start = time.perf_counter()
    seqs = await publish_all(js, RAW_SUBJECT, [body] * opts.raw_messages, opts.concurrency)
    elapsed = time.perf_counter() - start
    info = await js.stream_info(RAW_STREAM)
    if info.state.messages != opts.raw_messages or len(set(seqs)) != opts.raw_messages:
        raise BenchFailed(f"{RAW_STREAM} holds {info.state.messages} messages, expected {opts.raw_messages}")
    await js.delete_stream(RAW_STREAM)
    return Measurement("raw JetStream publish", opts.raw_messages, elapsed, elapsed)


async def measure_deposits(js: JetStreamContext, outcomes: Outcomes, opts: Options, keys: list[str],
                           count: int, label: str) -> Measurement:
    """Create ``keys`` (untimed), then time ``count`` deposits over them; check the balances."""
    await run_commands(js, outcomes, [create_account(k) for k in keys], opts, "account creations")
    plan = deposit_plan(keys, count)
    bodies = [deposit(key, amount, f"bench {i}") for i, (key, amount) in enumerate(plan)]
    _, send_s, total_s = await run_commands(js, outcomes, bodies, opts, f"{label} deposits")
    await check_balances(js, expected_balances(plan, keys), timeout=30.0)
    return Measurement(label, count, send_s, total_s)


async def open_accounts(js: JetStreamContext, outcomes: Outcomes, opts: Options, keys: list[str]) -> None:
    await run_commands(js, outcomes, [create_account(k) for k in keys], opts, "account creations")


async def daemon_throughput(js: JetStreamContext, outcomes: Outcomes, lag: load.ProjectorLag, opts: Options,
                            tag: str, side: Side) -> tuple[Measurement, Measurement, Measurement, int, float | None]:
    """Raw publish, then deposits over many keys (projector lag sampled) and on one key, then by
    commands in flight; returns raw, multi, single, events behind at most, seconds to catch up."""
    multi_keys = [f"acct-{tag}-{i}" for i in range(opts.keys)]
    progress("raw JetStream publish")
    raw = await measure_raw(js, opts, len(deposit(multi_keys[0], 50, f"bench {opts.commands}")))
    await lag.start(opts.ready_timeout)
    progress(f"daemon: {opts.commands} deposits over {opts.keys} keys")
    started = time.perf_counter()
    multi = await measure_deposits(js, outcomes, opts, multi_keys, opts.commands, f"e2e deposits, {opts.keys} keys")
    last_outcome = max(outcomes.seen_at.values())
    catch_up_s = await lag.catch_up(last_outcome, CATCH_UP_BOUND)
    await lag.stop()
    progress(f"daemon: {opts.single_key_commands} deposits on 1 key")
    single = await measure_deposits(js, outcomes, opts, [f"single-{tag}"], opts.single_key_commands,
                                    "e2e deposits, 1 key")
    side.multi, side.single = multi.rate, single.rate
    progress(f"daemon: commands in flight {', '.join(map(str, opts.in_flight))}")
    for level in opts.in_flight:
        keys = [f"flight{level}-{tag}-{i}" for i in range(opts.keys)]
        await open_accounts(js, outcomes, opts, keys)
        run = await load.closed_loop(js, outcomes, deposit_plan(keys, opts.in_flight_commands), level,
                                     opts.phase_timeout, f"{level} in flight")
        side.in_flight[level] = run.rate
    return raw, multi, single, lag.max_behind(started, last_outcome), catch_up_s


async def daemon_latency(js: JetStreamContext, outcomes: Outcomes, lag: load.ProjectorLag, opts: Options,
                         tag: str, side: Side, drain_rate: float) -> tuple[Capacity, load.LoadRun, load.LoadRun]:
    """One command at a time; the capacity under an open loop; then open-loop arrivals at a fraction
    of it, and at that fraction of ``drain_rate``."""
    progress(f"daemon: {opts.round_trips} commands one at a time")
    await open_accounts(js, outcomes, opts, [f"low-{tag}"])
    load.settle_heap()
    side.low_load = await load.one_at_a_time(js, outcomes, f"low-{tag}", opts.round_trips, opts.phase_timeout,
                                             "low load")

    async def accounts_for(name: str, rate: float, seconds: float) -> list[str]:
        keys = [f"{name.replace(' ', '-')}-{tag}-{i}" for i in range(opts.keys)]
        await open_accounts(js, outcomes, opts, keys)
        await lag.catch_up(time.perf_counter(), CATCH_UP_BOUND)  # the projector's backlog off the CPU first
        progress(f"daemon: open loop at {rate:.0f}/s for {seconds:.0f}s ({name})")
        load.settle_heap()
        return keys

    async def open_loop(rate: float, seconds: float, name: str) -> load.LoadRun:
        keys = await accounts_for(name, rate, seconds)
        return await load.open_loop(js, outcomes, keys, rate, seconds, opts.phase_timeout, name)

    async def offered(rate: float, name: str) -> Offered:
        keys = await accounts_for(name, rate, opts.load_seconds)
        sending = asyncio.create_task(load.open_loop(js, outcomes, keys, rate, opts.load_seconds,
                                                     opts.phase_timeout, name))
        try:
            projected = await lag.applied_per_second(opts.load_seconds)
        except BaseException:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            raise
        return Offered(rate, load.done_within(await sending, rate, opts.load_seconds), projected)

    # Each step as long as the 80 % run it sets, so that both see the machine for as long: over 4 s
    # it read higher (1,190-1,375/s against 1,097-1,246/s over 10 s, four runs each, alternating).
    # Under overload the projectors (a nicer process) fall behind while the aggregates decide more
    # than they sustain once the read model must keep up: the search finds the rate where both do.
    steps = [await offered(OVERLOAD * drain_rate, "capacity")]
    rate = max(steps[0].decided, 1.0)
    while not steps[-1].kept_pace and len(steps) <= CAPACITY_STEPS:
        steps.append(await offered(rate, f"capacity {len(steps)}"))
        rate *= CAPACITY_STEP
    capacity = Capacity(tuple(steps))
    loaded = await open_loop(targets.LOAD_FRACTION * capacity.rate, opts.load_seconds, "loaded")
    loaded_on_drain = await open_loop(targets.LOAD_FRACTION * drain_rate, opts.load_seconds, "loaded on drain")
    return capacity, loaded, loaded_on_drain


async def daemon_history(js: JetStreamContext, outcomes: Outcomes, lag: load.ProjectorLag, opts: Options,
                         tag: str, side: Side) -> float:
    """One key given ``opts.history_events`` deposits, then one at a time on it and on a fresh key,
    alternating so both see the same noise; returns the seconds the history took to build."""
    history_key, fresh_key = f"history-{tag}", f"fresh-{tag}"
    await open_accounts(js, outcomes, opts, [history_key, fresh_key])
    progress(f"daemon: {opts.history_events} deposits of history on one key, then {opts.history_rounds} rounds")
    started = time.perf_counter()
    await run_commands(js, outcomes, [deposit(history_key, 1, f"history {n}") for n in range(opts.history_events)],
                       opts, "history deposits")
    seed_s = time.perf_counter() - started
    await lag.catch_up(time.perf_counter(), CATCH_UP_BOUND)  # the projector's backlog off the CPU first
    load.settle_heap()
    for n in range(opts.history_rounds):
        side.fresh += await load.one_at_a_time(js, outcomes, fresh_key, 1, opts.phase_timeout, f"fresh {n}")
        side.history += await load.one_at_a_time(js, outcomes, history_key, 1, opts.phase_timeout, f"history {n}")
    return seed_s


async def daemon_phases(nc: NATS, daemon: subprocess.Popen[bytes], opts: Options,
                        tag: str) -> tuple[Side, DaemonExtras]:
    side = Side(plot.DAEMON)
    js = nc.jetstream()
    ready_s = await wait_until_ready(nc, daemon, opts, tag)
    outcomes = Outcomes(nc)
    lag = load.ProjectorLag(js)
    await outcomes.start()
    try:
        raw, multi, single, lag_behind, catch_up_s = await daemon_throughput(js, outcomes, lag, opts, tag, side)
        capacity, loaded, loaded_on_drain = await daemon_latency(js, outcomes, lag, opts, tag, side, multi.rate)
        history_seed_s = await daemon_history(js, outcomes, lag, opts, tag, side)
    finally:
        await lag.stop()
        await outcomes.stop()
    if outcomes.read_directly:
        side.notes.append(f"{outcomes.read_directly} outcomes were read directly after the CC_RESULTS watch fell "
                          f"{Outcomes.QUIET_SECONDS:.0f}s behind; their times include that wait")
    if daemon.poll() is not None:
        raise BenchFailed(f"the daemon exited with {daemon.returncode} during the run")
    return side, DaemonExtras(raw, multi, single, ready_s, capacity, loaded, loaded_on_drain, lag_behind, catch_up_s,
                              history_seed_s)


# -- pyeventsourcing -------------------------------------------------------------------------------

def peer_phases(db_path: Path, opts: Options, tag: str) -> Side:
    """The same deposits on pyeventsourcing, with ``opts.concurrency`` threads serving them."""
    side = Side(plot.PEER)
    progress("pyeventsourcing: the same phases")
    bank = peer.open_bank(db_path)
    try:
        def fresh_accounts(keys: list[str]) -> list[str]:
            for key in keys:
                bank.open_account(key, INITIAL_BALANCE)
            return keys

        keys = fresh_accounts([f"acct-{tag}-{i}" for i in range(opts.keys)])
        plan = deposit_plan(keys, opts.commands)
        multi = peer.run_deposits(bank, plan, opts.concurrency, opts.phase_timeout)
        wrong = [k for k, v in expected_balances(plan, keys).items() if bank.balance(k) != v]
        if wrong:
            raise BenchFailed(f"pyeventsourcing: {len(wrong)} balances wrong, e.g. {wrong[0]}")
        single_key = fresh_accounts([f"single-{tag}"])
        single = peer.run_deposits(bank, deposit_plan(single_key, opts.single_key_commands), opts.concurrency,
                                   opts.phase_timeout)
        side.multi, side.single = multi.rate, single.rate
        side.notes.append(f"races lost and retried: {multi.conflicts} over {opts.keys} keys, "
                          f"{single.conflicts} on 1 key")

        low_key = fresh_accounts([f"low-{tag}"])[0]
        load.settle_heap()
        side.low_load = peer.round_trips(bank, low_key, opts.round_trips)
        for level in opts.in_flight:
            keys = fresh_accounts([f"flight{level}-{tag}-{i}" for i in range(opts.keys)])
            side.in_flight[level] = peer.run_deposits(bank, deposit_plan(keys, opts.in_flight_commands), level,
                                                      opts.phase_timeout).rate

        history_key, fresh_key = fresh_accounts([f"history-{tag}", f"fresh-{tag}"])
        peer.seed_history(bank, history_key, opts.history_events)
        load.settle_heap()
        for _ in range(opts.history_rounds):
            side.fresh += peer.round_trips(bank, fresh_key, 1)
            side.history += peer.round_trips(bank, history_key, 1)
        side.notes.append(f"database {peer.database_size(db_path) / 1e6:.1f} MB")
    finally:
        bank.close()
    return side


# -- report ----------------------------------------------------------------------------------------

def ms(latencies: list[float], q: float) -> float:
    ordered = sorted(latencies)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)] * 1000


def machine() -> str:
    return (f"{os.cpu_count()} cores, Python {platform.python_version()}, eventsourcing {version('eventsourcing')}, "
            f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.machine()}")


def report(opts: Options, daemon: Side, peer_side: Side, x: DaemonExtras) -> str:
    raw = x.raw
    lines = [
        f"concordance bench: {machine()}; concurrency {opts.concurrency}, daemon ready in {x.ready_s:.1f}s "
        f"(concordance up {' '.join(opts.daemon_options) or 'in one process'})",
        f"{'phase':<28}{'count':>7}{'sent (s)':>10}{'done (s)':>10}{'per s':>9}{'vs raw':>8}",
    ]
    for row in (raw, x.multi, x.single):
        lines.append(f"{row.label:<28}{row.count:>7}{row.send_seconds:>10.2f}{row.total_seconds:>10.2f}"
                     f"{row.rate:>9.0f}{row.rate / raw.rate:>8.3f}")
    lines.append(
        f"bench: e2e {x.multi.rate:.0f} commands/s ({opts.keys} keys), {x.single.rate:.0f} commands/s (1 key), "
        f"raw JetStream publish {raw.rate:.0f} msgs/s -> ratio {x.multi.rate / raw.rate:.3f} "
        f"(1 key {x.single.rate / raw.rate:.3f})")

    lines += ["", f"against pyeventsourcing (SQLite file, {opts.concurrency} threads; a lost race is retried):",
              f"{'':<26}{f'{opts.keys} keys/s':>12}{'vs raw':>8}{'1 key/s':>10}{'vs raw':>8}"]
    for side in (daemon, peer_side):
        lines.append(f"{side.name:<26}{side.multi:>12.0f}{side.multi / raw.rate:>8.3f}"
                     f"{side.single:>10.0f}{side.single / raw.rate:>8.3f}")
    lines.append(f"{'daemon / pyeventsourcing':<26}{daemon.multi / peer_side.multi:>11.2f}x{'':>8}"
                 f"{daemon.single / peer_side.single:>9.2f}x")
    lines += [f"  {side.name}: {note}" for side in (daemon, peer_side) for note in side.notes]

    levels = list(opts.in_flight)
    lines += ["", f"commands/s by commands in flight ({opts.in_flight_commands} deposits over {opts.keys} fresh "
                  "accounts; each client waits for its outcome):",
              f"{'in flight':<26}" + "".join(f"{n:>7}" for n in levels)]
    for side in (daemon, peer_side):
        lines.append(f"{side.name:<26}" + "".join(f"{side.in_flight[n]:>7.0f}" for n in levels))

    lines += ["", f"one command at a time ({opts.round_trips} deposits), ms p50 / p90 / p99:"]
    for side in (daemon, peer_side):
        lines.append(f"  {side.name:<26}{ms(side.low_load, .5):>7.1f}{ms(side.low_load, .9):>7.1f}"
                     f"{ms(side.low_load, .99):>7.1f}")
    loaded = x.loaded
    lines += ["", f"daemon capacity: open loops for {opts.load_seconds:.0f}s each, first at {OVERLOAD:.1f} x the "
                  f"{opts.keys}-key rate, then from what was decided there down by {CAPACITY_STEP} until the "
                  f"outcomes and the read model kept pace ({DECIDED_PACE:.0%} and {PROJECTED_PACE:.0%} of the "
                  "arrivals, per second while they were sent):"]
    lines += [f"  {step.rate:6.0f}/s offered: {step.decided:6.0f}/s decided, {step.projected:6.0f} events/s into the "
              f"read model{'  kept pace' if step.kept_pace else ''}" for step in x.capacity.steps]
    lines.append(f"  capacity {x.capacity.rate:.0f}/s: what it sustains end to end with the load generator beside it")
    for name, run, of in ((f"{targets.LOAD_FRACTION:.0%} of capacity", loaded, x.capacity.rate),
                          (f"{targets.LOAD_FRACTION:.0%} of the {opts.keys}-key rate", x.loaded_on_drain, x.multi.rate)):
        lines.append(f"daemon at {name} ({of:.0f}/s): {targets.LOAD_FRACTION * of:.0f} commands/s arriving "
                     f"(open loop) for {opts.load_seconds:.0f}s over {opts.keys} accounts, {run.count} commands: p50 "
                     f"{ms(run.latencies, .5):.1f} ms, p99 {ms(run.latencies, .99):.1f} ms, done at {run.rate:.0f}/s")

    estimate = targets.HISTORY_EVENTS * x.history_seed_s / opts.history_events / 60
    lines += ["", f"cost with history: {opts.history_events} earlier events on one account against a fresh one, "
                  f"{opts.history_rounds} commands each, alternating ({opts.history_events} took "
                  f"{x.history_seed_s:.0f}s to build through the daemon, so {targets.HISTORY_EVENTS} would take "
                  f"about {estimate:.0f} min):"]
    for side in (daemon, peer_side):
        lines.append(f"  {side.name:<26}p50 fresh {ms(side.fresh, .5):.1f} ms, with history "
                     f"{ms(side.history, .5):.1f} ms (x{ms(side.history, .5) / ms(side.fresh, .5):.2f})")

    lag_seconds = x.lag_behind / x.multi.rate
    catch_up = "not within %.0fs" % CATCH_UP_BOUND if x.catch_up_s is None else f"{x.catch_up_s:.2f}s"
    lines += ["", f"projector during the {opts.keys}-key run: at most {x.lag_behind} events behind the log "
                  f"({lag_seconds:.2f}s of traffic at {x.multi.rate:.0f} events/s); current {catch_up} after "
                  "the last command's outcome"]

    flat = ms(daemon.history, .5) / ms(daemon.fresh, .5)
    found = [
        targets.at_least(f"over {opts.keys} keys: daemon / pyeventsourcing", daemon.multi / peer_side.multi,
                         targets.MULTI_KEY_RATIO),
        targets.at_least("on 1 key: daemon / pyeventsourcing (1-key figure)", daemon.single / peer_side.single,
                         targets.SINGLE_KEY_RATIO),
        targets.at_most("one command at low load: p50", ms(daemon.low_load, .5), targets.LOW_LOAD_P50_MS, " ms"),
        targets.at_most(f"at {targets.LOAD_FRACTION:.0%} of capacity ({x.loaded_rate:.0f}/s): p99",
                        ms(loaded.latencies, .99), targets.LOADED_P99_MS, " ms"),
        targets.at_most(f"{opts.history_events} earlier events: p50 / fresh p50", flat, targets.FLAT_WITH_HISTORY,
                        "x", 2),
        targets.at_most("projector lag during the run", lag_seconds, targets.LAG_SECONDS, " s of traffic", 2),
        targets.at_most("projector current after the last command", x.catch_up_s, targets.LAG_SECONDS, " s", 2),
    ]
    lines += ["", targets.table(found)]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------

async def benchmark(nats_url: str, daemon: subprocess.Popen[bytes], opts: Options, workdir: Path) -> str:
    tag = uuid.uuid4().hex[:8]  # keys unique to this run
    nc: NATS = await nats.connect(nats_url, max_reconnect_attempts=3, connect_timeout=5)
    try:
        daemon_side, extras = await daemon_phases(nc, daemon, opts, tag)
    finally:
        try:
            await asyncio.wait_for(nc.close(), 10.0)
        except asyncio.TimeoutError:
            pass
    # the daemon is stopped first, so that pyeventsourcing (synchronous, on its own threads) has the
    # machine as the daemon had it
    await asyncio.to_thread(stop_daemon, daemon)
    peer_side = await asyncio.to_thread(peer_phases, workdir / "peer" / "bank.sqlite", opts, tag)
    text = report(opts, daemon_side, peer_side, extras)
    caption = (f"{machine()}; one run, daemon / pyeventsourcing: {daemon_side.multi / peer_side.multi:.2f}x "
               f"over {opts.keys} keys ({opts.concurrency} in flight), "
               f"{daemon_side.single / peer_side.single:.2f}x on 1 key")
    path = plot.write(opts.plot_path, {s.name: s.in_flight for s in (daemon_side, peer_side)},
                      {s.name: s.low_load for s in (daemon_side, peer_side)}, caption)
    return f"{text}\n\nplot: {path}"


async def within(work: Awaitable[str], seconds: float) -> str:
    """``work``'s result; after ``seconds``, where each of the run's tasks was waiting goes to stderr
    (the run ends with asyncio.TimeoutError), so that a run that stalls shows where."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        for other in asyncio.all_tasks():
            if other is not asyncio.current_task():
                print(f"task {other.get_name()} waits in:\n  " + "\n  ".join(awaiting(other)), file=sys.stderr)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise asyncio.TimeoutError
    return task.result()


def awaiting(task: asyncio.Task) -> list[str]:
    """Where a suspended task is, outermost first: each coroutine it awaits, down to the last."""
    where, coro = [], task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            where.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return where


def run(opts: Options) -> int:
    with tempfile.TemporaryDirectory(prefix="concordance-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "peer").mkdir()
        server = EmbeddedNatsServer(workdir / "nats", free_port(), name="concordance-bench")
        daemon_log = workdir / "daemon.log"
        try:
            server.start()
            daemon = start_daemon(server.url, daemon_log, *opts.daemon_options)
            try:
                print(asyncio.run(within(benchmark(server.url, daemon, opts, workdir), opts.overall_timeout)))
                # what the daemon said meanwhile (it logs warnings and errors only), to explain an outlier
                said = ", ".join(f"{event!r} x{count}" for event, count in logged_events(daemon_log).most_common())
                print(f"daemon warnings and errors during the run: {said or 'none'}")
                return 0
            except (BenchFailed, asyncio.TimeoutError, nats.errors.Error) as exc:
                reason = str(exc) or f"overall timeout of {opts.overall_timeout:.0f}s"
                print(f"bench FAILED: {reason}", file=sys.stderr)
                if log := tail(daemon_log):
                    print(f"last daemon log lines:\n{log}", file=sys.stderr)
                return 1
            finally:
                stop_daemon(daemon)
        finally:
            server.stop()


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--raw-messages", type=int, default=20000, help="messages for the raw baseline")
    parser.add_argument("--commands", type=int, default=5000,
                        help="deposits over --keys accounts, sent at once (the capacity run offers 1.3x their rate)")
    parser.add_argument("--keys", type=int, default=50, help="accounts for the multi-key runs")
    parser.add_argument("--single-key-commands", type=int, default=300, help="deposits on one account")
    parser.add_argument("--concurrency", type=int, default=32, help="publishes (and peer threads) in flight")
    parser.add_argument("--round-trips", type=int, default=200, help="commands one at a time at low load")
    parser.add_argument("--in-flight", type=str, default="1,2,4,8,16,32,64", help="levels for the plot")
    parser.add_argument("--in-flight-commands", type=int, default=240, help="deposits per level")
    parser.add_argument("--load-seconds", type=float, default=10.0, help="length of each 80%% open-loop run")
    parser.add_argument("--history-events", type=int, default=5000, help="earlier events on the history key")
    parser.add_argument("--history-rounds", type=int, default=40, help="commands each on fresh and history keys")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="where the PNG goes")
    parser.add_argument("--one-process", action="store_true",
                        help="run the daemon in one process (without --stateless-process)")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds for the daemon to start")
    parser.add_argument("--phase-timeout", type=float, default=240.0, help="seconds for one phase's outcomes")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    args = parser.parse_args(argv)
    for name in ("raw_messages", "commands", "keys", "single_key_commands", "concurrency", "round_trips",
                 "in_flight_commands", "history_events", "history_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        levels = tuple(sorted({int(n) for n in args.in_flight.split(",")}))
    except ValueError:
        parser.error("--in-flight takes comma-separated whole numbers")
    if not levels or levels[0] < 1:
        parser.error("--in-flight levels must be at least 1")
    if args.load_seconds <= 0:
        parser.error("--load-seconds must be positive")
    return Options(args.raw_messages, args.commands, args.keys, args.single_key_commands, args.concurrency,
                   args.ready_timeout, args.phase_timeout, args.timeout, args.round_trips, levels,
                   args.in_flight_commands, args.load_seconds, args.history_events, args.history_rounds,
                   args.plot, args.one_process)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    configure_logging("warning")  # keep nats-server start/stop lines out of the report
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
