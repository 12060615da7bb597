"""End-to-end command throughput of Concordance, against raw JetStream publishing on the same box.

What it measures, in one run against its own loopback nats-server and daemon:

* raw:   JetStream publishes with request/ack into a plain file stream (BENCH_RAW) -- the
         ceiling any command path through JetStream can reach on this machine;
* e2e:   deposit commands spread over many accounts, timed from the first send until every
         command's outcome is in KV CC_RESULTS (all must be accepted, balances must add up);
* 1 key: deposits on a single account, where the daemon must handle them one after another.

Absolute rates depend on the machine and whatever else runs on it, so the figures to quote are
the ratios e2e / raw: both sides are measured minutes apart, on the same server, with the same
client concurrency and message size, so most of the noise cancels.

Run: ``.venv/bin/python -m benchmarks.bench [--commands N --keys K ...]`` from the project root.
Exits non-zero if any command is lost, rejected or late, or a balance is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Iterator

import nats
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from concordance_provider.logging import configure as configure_logging
from concordance_provider.naming import (
    COMMANDS_STREAM,
    RESULTS_BUCKET,
    STATE_BUCKET,
    aggregate_state_key,
    command_subject,
)
from concordance_provider.nats_server import EmbeddedNatsServer, free_port

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = Path("examples/bankaccount/app.yaml")
AGGREGATE = "bankaccount"
RAW_STREAM, RAW_SUBJECT = "BENCH_RAW", "bench.raw"
INITIAL_BALANCE = 1000
PUBLISH_TIMEOUT = 10.0  # seconds for one JetStream ack
POLL_SECONDS = 0.25


class BenchFailed(Exception):
    """The system under test lost, rejected or delayed work, or got a balance wrong."""


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


@dataclass(frozen=True)
class Measurement:
    label: str
    count: int
    send_seconds: float  # until the last JetStream ack
    total_seconds: float  # until the last outcome (raw: same as send_seconds)

    @property
    def rate(self) -> float:
        return self.count / self.total_seconds


# -- processes -------------------------------------------------------------------------------------

def start_daemon(nats_url: str, log_path: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "concordance_provider.cli", "up", str(MANIFEST),
               "--nats-url", nats_url, "--log-level", "warning"]
    with log_path.open("wb") as log_file:
        return subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT)


def stop_daemon(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM by PID, wait, and kill if it does not stop in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"daemon {process.pid} ignored SIGTERM for {timeout:.0f}s; killing it", file=sys.stderr)
        process.kill()
        process.wait(10)
    if process.returncode != 0:
        print(f"daemon {process.pid} exited with {process.returncode} after SIGTERM", file=sys.stderr)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- messages --------------------------------------------------------------------------------------

def command_body(command_type: str, key: str, data: dict) -> bytes:
    return json.dumps({"command_type": command_type, "key": key, "data": data}).encode()


def create_account(key: str) -> bytes:
    return command_body("create_account", key, {
        "accountNumber": key, "initialBalance": INITIAL_BALANCE, "minBalance": 0, "customerId": "bench",
    })


def deposit(key: str, amount: int, note: str) -> bytes:
    return command_body("deposit_funds", key, {
        "accountNumber": key, "amount": amount, "customerId": "bench", "note": note,
    })


def deposit_plan(keys: list[str], count: int) -> list[tuple[str, int]]:
    """``count`` deposits round-robin over ``keys``, with varied amounts."""
    return [(keys[i % len(keys)], 1 + i % 97) for i in range(count)]


def expected_balances(plan: Iterable[tuple[str, int]], keys: Iterable[str]) -> dict[str, int]:
    balances = {key: INITIAL_BALANCE for key in keys}
    for key, amount in plan:
        balances[key] += amount
    return balances


# -- sending ---------------------------------------------------------------------------------------

async def publish_all(js: JetStreamContext, subject: str, bodies: list[bytes], concurrency: int) -> list[int]:
    """Publish with request/ack, ``concurrency`` in flight; returns the stream sequences."""
    seqs: list[int] = [0] * len(bodies)
    todo: Iterator[int] = iter(range(len(bodies)))

    async def worker() -> None:
        for index in todo:  # a shared iterator: each index goes to exactly one worker
            ack = await js.publish(subject, bodies[index], timeout=PUBLISH_TIMEOUT)
            seqs[index] = ack.seq

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    return seqs


class Outcomes:
    """Every command outcome written to CC_RESULTS while it runs, by command sequence."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self.status: dict[int, str] = {}
        self.errors: dict[int, str] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None

    async def start(self) -> None:
        self._watcher = await self._kv.watchall(ignore_deletes=True)
        self._task = asyncio.create_task(self._collect(self._watcher))

    async def _collect(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None or not entry.value:
                continue  # None marks the end of the initial values
            result = json.loads(entry.value)
            seq = int(entry.key)
            self.status[seq] = result.get("status", "?")
            if result.get("error"):
                self.errors[seq] = result["error"]
            self._changed.set()

    async def wait_for(self, seqs: Iterable[int], timeout: float) -> None:
        """Until every sequence has an outcome; raises BenchFailed after ``timeout`` seconds."""
        wanted = set(seqs)
        deadline = time.monotonic() + timeout
        while not wanted <= self.status.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                missing = len(wanted - self.status.keys())
                raise BenchFailed(f"{missing} of {len(wanted)} commands have no outcome after {timeout:.0f}s")
            if self._task is not None and self._task.done():
                raise BenchFailed(f"the CC_RESULTS watch ended: {self._task.exception()!r}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass

    def check_accepted(self, seqs: Iterable[int], what: str) -> None:
        rejected = [seq for seq in seqs if self.status.get(seq) != "accepted"]
        if rejected:
            first = rejected[0]
            raise BenchFailed(f"{len(rejected)} {what} not accepted; e.g. command {first}: "
                              f"{self.status.get(first)} {self.errors.get(first, '')}".rstrip())

    async def stop(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


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


# -- readiness and checks ---------------------------------------------------------------------------

async def poll_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str,
                     daemon: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon is not None and daemon.poll() is not None:
            raise BenchFailed(f"the daemon exited with {daemon.returncode} while waiting for {what}")
        if await check():
            return
        await asyncio.sleep(POLL_SECONDS)
    raise BenchFailed(f"timed out after {timeout:.0f}s waiting for {what}")


async def wait_until_ready(js: JetStreamContext, daemon: subprocess.Popen[bytes], opts: Options,
                           tag: str) -> float:
    """Streams, buckets and the command consumer exist, and a probe command is accepted."""
    start = time.perf_counter()

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
    results = await js.key_value(RESULTS_BUCKET)
    ack = await js.publish(command_subject(AGGREGATE), create_account(f"probe-{tag}"), timeout=PUBLISH_TIMEOUT)

    async def probe_done() -> bool:
        try:
            entry = await results.get(str(ack.seq))
        except KeyNotFoundError:
            return False
        status = json.loads(entry.value or b"{}").get("status")
        if status != "accepted":
            raise BenchFailed(f"the probe command was {status}: {entry.value!r}")
        return True

    left = max(opts.ready_timeout - (time.perf_counter() - start), 1.0)
    await poll_until(probe_done, left, "the probe command's outcome", daemon)
    return time.perf_counter() - start


async def read_balances(states: KeyValue, keys: Iterable[str]) -> dict[str, int | None]:
    balances: dict[str, int | None] = {}
    for key in keys:
        try:
            entry = await states.get(aggregate_state_key(AGGREGATE, key))
            balances[key] = json.loads(entry.value or b"null")["balance"]
        except (KeyNotFoundError, TypeError, KeyError, ValueError):
            balances[key] = None
    return balances


async def check_balances(js: JetStreamContext, expected: dict[str, int], timeout: float) -> None:
    """Stored state must show every deposit; a short grace period allows a lagging state write."""
    states = await js.key_value(STATE_BUCKET)
    wrong: dict[str, tuple[int | None, int]] = {}

    async def all_right() -> bool:
        actual = await read_balances(states, expected)
        wrong.clear()
        wrong.update({k: (actual[k], v) for k, v in expected.items() if actual[k] != v})
        return not wrong

    try:
        await poll_until(all_right, timeout, "balances")
    except BenchFailed:
        sample = ", ".join(f"{k}: {got} != {want}" for k, (got, want) in list(wrong.items())[:5])
        raise BenchFailed(f"{len(wrong)} of {len(expected)} balances are wrong after every command "
                          f"was accepted (got != expected): {sample}") from None


# -- phases ----------------------------------------------------------------------------------------

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


# -- report ----------------------------------------------------------------------------------------

def report(raw: Measurement, multi: Measurement, single: Measurement, opts: Options, ready_s: float) -> str:
    rows = [raw, multi, single]
    lines = [
        f"concordance bench: concurrency {opts.concurrency}, daemon ready in {ready_s:.1f}s",
        f"{'phase':<28}{'count':>7}{'sent (s)':>10}{'done (s)':>10}{'per s':>9}{'vs raw':>8}",
    ]
    for row in rows:
        lines.append(f"{row.label:<28}{row.count:>7}{row.send_seconds:>10.2f}{row.total_seconds:>10.2f}"
                     f"{row.rate:>9.0f}{row.rate / raw.rate:>8.3f}")
    lines.append(
        f"bench: e2e {multi.rate:.0f} commands/s ({opts.keys} keys), {single.rate:.0f} commands/s (1 key), "
        f"raw JetStream publish {raw.rate:.0f} msgs/s -> ratio {multi.rate / raw.rate:.3f} "
        f"(1 key {single.rate / raw.rate:.3f})"
    )
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------

async def benchmark(nats_url: str, daemon: subprocess.Popen[bytes], opts: Options) -> str:
    tag = uuid.uuid4().hex[:8]  # keys unique to this run
    nc: NATS = await nats.connect(nats_url, max_reconnect_attempts=3, connect_timeout=5)
    try:
        js = nc.jetstream()
        ready_s = await wait_until_ready(js, daemon, opts, tag)
        outcomes = Outcomes(await js.key_value(RESULTS_BUCKET))
        await outcomes.start()
        try:
            multi_keys = [f"acct-{tag}-{i}" for i in range(opts.keys)]
            body_size = len(deposit(multi_keys[0], 50, f"bench {opts.commands}"))
            raw = await measure_raw(js, opts, body_size)
            multi = await measure_deposits(js, outcomes, opts, multi_keys, opts.commands,
                                           f"e2e deposits, {opts.keys} keys")
            single = await measure_deposits(js, outcomes, opts, [f"single-{tag}"],
                                            opts.single_key_commands, "e2e deposits, 1 key")
        finally:
            await outcomes.stop()
        if daemon.poll() is not None:
            raise BenchFailed(f"the daemon exited with {daemon.returncode} during the run")
        return report(raw, multi, single, opts, ready_s)
    finally:
        await nc.close()


def run(opts: Options) -> int:
    with tempfile.TemporaryDirectory(prefix="concordance-bench-") as tmp:
        workdir = Path(tmp)
        server = EmbeddedNatsServer(workdir / "nats", free_port(), name="concordance-bench")
        daemon_log = workdir / "daemon.log"
        try:
            server.start()
            daemon = start_daemon(server.url, daemon_log)
            try:
                print(asyncio.run(asyncio.wait_for(benchmark(server.url, daemon, opts), opts.overall_timeout)))
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
    parser.add_argument("--commands", type=int, default=2000, help="deposits over --keys accounts")
    parser.add_argument("--keys", type=int, default=50, help="accounts for the multi-key run")
    parser.add_argument("--single-key-commands", type=int, default=300, help="deposits on one account")
    parser.add_argument("--concurrency", type=int, default=32, help="publishes in flight")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds for the daemon to start")
    parser.add_argument("--phase-timeout", type=float, default=240.0, help="seconds for one phase's outcomes")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    args = parser.parse_args(argv)
    for name in ("raw_messages", "commands", "keys", "single_key_commands", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return Options(args.raw_messages, args.commands, args.keys, args.single_key_commands,
                   args.concurrency, args.ready_timeout, args.phase_timeout, args.timeout)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    configure_logging("warning")  # keep nats-server start/stop lines out of the report
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
