"""The daemon as a client sees it: its process, the bank commands, and their outcomes in CC_RESULTS.

Everything here goes through the public wire only: commands published with request/ack on
``cc.commands.bankaccount``, outcomes watched in KV ``CC_RESULTS``, balances read from ``CC_STATE``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Iterator

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from concordance_provider.naming import RESULTS_BUCKET, STATE_BUCKET, aggregate_state_key, result_seq
from concordance_provider.store.results import read_result

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = Path("examples/bankaccount/app.yaml")
AGGREGATE = "bankaccount"
INITIAL_BALANCE = 1000
PUBLISH_TIMEOUT = 10.0  # seconds for one JetStream ack
POLL_SECONDS = 0.25


class BenchFailed(Exception):
    """The system under test lost, rejected or delayed work, or got a balance wrong."""


# -- processes -------------------------------------------------------------------------------------

def start_daemon(nats_url: str, log_path: Path, *options: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "concordance_provider.cli", "up", str(MANIFEST),
               "--nats-url", nats_url, "--log-level", "warning", *options]
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


def logged_events(path: Path) -> Counter[str]:
    """How often each event was logged to ``path`` (JSON lines; other lines count as themselves)."""
    counts: Counter[str] = Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return counts
    for line in lines:
        try:
            counts[str(json.loads(line).get("event", line))] += 1
        except (ValueError, AttributeError):
            counts[line] += 1
    return counts


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
    """Every command outcome written to CC_RESULTS while it runs, by command sequence.

    Outcomes arrive through a watch of the bucket; one that has not arrived after a quiet spell is
    read directly, so a watch that falls behind on a loaded machine slows the bench but never stalls it.
    """

    QUIET_SECONDS = 2.0  # the watch silent this long: read missing outcomes directly
    READS_PER_SPELL = 100

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self.status: dict[int, str] = {}
        self.errors: dict[int, str] = {}
        self.seen_at: dict[int, float] = {}  # time.perf_counter() when the outcome reached this client
        self.read_directly = 0  # outcomes the watch had not delivered when they were read
        self._waiting: dict[int, asyncio.Future[float]] = {}
        self._watched_at = time.monotonic()  # when the watch last delivered
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None

    async def start(self) -> None:
        kv = await self._nc.jetstream().key_value(RESULTS_BUCKET)
        self._watcher = await kv.watchall(ignore_deletes=True)
        self._task = asyncio.create_task(self._collect(self._watcher))

    def _record(self, seq: int, value: bytes) -> None:
        if seq in self.seen_at:
            return
        result = json.loads(value)
        self.status[seq] = result.get("status", "?")
        if result.get("error"):
            self.errors[seq] = result["error"]
        self.seen_at[seq] = time.perf_counter()
        waiter = self._waiting.pop(seq, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(self.seen_at[seq])
        self._changed.set()

    async def _collect(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            self._watched_at = time.monotonic()
            if entry is not None and entry.value:  # None marks the end of the initial values
                self._record(result_seq(entry.key), entry.value)

    async def _read(self, seqs: Iterable[int]) -> None:
        for seq in list(seqs)[:self.READS_PER_SPELL]:
            value = await read_result(self._nc, seq)
            if value is not None and seq not in self.seen_at:
                self.read_directly += 1
                self._record(seq, value)

    async def arrival(self, seq: int, timeout: float) -> float:
        """When command ``seq``'s outcome reached this client (perf_counter); BenchFailed after ``timeout``."""
        deadline = time.monotonic() + timeout
        waiter = self._waiting.setdefault(seq, asyncio.get_running_loop().create_future())
        while seq not in self.seen_at:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchFailed(f"command {seq} has no outcome after {timeout:.0f}s")
            try:
                await asyncio.wait_for(asyncio.shield(waiter), min(left, self.QUIET_SECONDS))
            except asyncio.TimeoutError:
                await self._read([seq])
        return self.seen_at[seq]

    async def wait_for(self, seqs: Iterable[int], timeout: float) -> None:
        """Until every sequence has an outcome; raises BenchFailed after ``timeout`` seconds."""
        wanted = set(seqs)
        missing = wanted - self.status.keys()
        deadline = time.monotonic() + timeout
        while missing:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchFailed(f"{len(missing)} of {len(wanted)} commands have no outcome after {timeout:.0f}s")
            if self._task is not None and self._task.done():
                raise BenchFailed(f"the CC_RESULTS watch ended: {self._task.exception()!r}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass
            if time.monotonic() - self._watched_at >= self.QUIET_SECONDS:
                await self._read(sorted(missing - self.status.keys()))
            missing = {seq for seq in missing if seq not in self.status}

    def check_accepted(self, seqs: Iterable[int], what: str) -> None:
        rejected = [seq for seq in seqs if self.status.get(seq) != "accepted"]
        if rejected:
            first = rejected[0]
            raise BenchFailed(f"{len(rejected)} {what} not accepted; e.g. command {first}: "
                              f"{self.status.get(first)} {self.errors.get(first, '')}".rstrip())

    async def stop(self) -> None:
        if self._watcher is not None:
            try:
                await asyncio.wait_for(self._watcher.stop(), 5.0)
            except (asyncio.TimeoutError, nats.errors.Error):
                pass  # the connection closes next anyway
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


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


