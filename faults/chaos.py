"""The fault suite's faults, spread over the load: ``kill -9`` of the daemon, ``kill -9`` of its
embedded nats-server, and crashes at failpoints (``CONCORDANCE_FAILPOINTS``), where the daemon
exits by itself (code 86) at the N-th pass through a named point. The supervisor restarts a
daemon that crashed, without the failpoint."""

from __future__ import annotations

import asyncio
import os
import random
import select
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from concordance_provider.failpoints import CRASH_EXIT_CODE, ENV, POINTS
from tests.integration.harness import DaemonProcess

from .load import Plan, Progress

# Points passed only when a message becomes a dead letter: in this load, a malformed command.
RARE_POINTS = {"deadletter.before_store", "deadletter.after_store"}
FIRST, LAST = 0.05, 0.6  # faults fall between these fractions of the load
EXIT_TIMEOUT = 30.0
FIRE_TIMEOUT = 20.0  # how long an armed failpoint is given to fire before the next fault


def failpoint_plan(plan: Plan) -> list[str]:
    """``plan.failpoints`` armings: a point and the pass to crash at, drawn from a seeded RNG."""
    rng = random.Random(plan.seed + 2)
    points: list[str] = []
    while len(points) < plan.failpoints:  # every point once before any twice
        points += rng.sample(sorted(POINTS), len(POINTS))
    return [f"{p}=crash@{1 if p in RARE_POINTS else rng.randint(1, 5)}" for p in points[:plan.failpoints]]


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` (not necessarily a child) has exited; False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


@dataclass
class Counts:
    kills: int = 0
    nats_restarts: int = 0
    failpoint_crashes: int = 0
    failpoints_armed: int = 0
    unexpected_exits: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)  # each fault, and where in the load it fell


class Supervisor:
    """Owns the daemon that runs now: starts it (with a failpoint armed or not), kills it,
    and restarts it when it exits by itself."""

    def __init__(self, manifest: Path, workdir: Path, port: int) -> None:
        self._manifest = manifest
        self._workdir = workdir
        self._port = port
        self._runs = 0
        self._lock = asyncio.Lock()
        self._stopping = False
        self.daemon: DaemonProcess | None = None
        self.armed: str | None = None  # the failpoint the running daemon carries, until it fires
        self._fired = asyncio.Event()  # set while no failpoint is armed
        self._fired.set()
        self.counts = Counts()
        self.where: Callable[[], str] = lambda: ""  # where the load is, for the timeline

    def _note(self, what: str) -> None:
        self.counts.timeline.append(f"{what} {self.where()}".strip())

    def _start(self, failpoint: str | None) -> tuple[DaemonProcess, str | None]:
        """Start a daemon and wait until it serves; one that crashes at its failpoint while
        starting counts as a crash and is started again without it. Returns the daemon and
        the failpoint it still carries."""
        while True:
            self._runs += 1
            daemon = DaemonProcess(self._manifest, self._workdir / f"daemon-{self._runs}.log",
                                   "--state-dir", str(self._workdir / "state"), "--port", str(self._port),
                                   env={ENV: failpoint or ""})
            try:
                daemon.wait_ready()
                return daemon, failpoint
            except AssertionError:
                code = daemon.stop()
                self._await_server_gone(daemon)
                if failpoint is None or code != CRASH_EXIT_CODE:
                    raise
                self.counts.failpoint_crashes += 1
                self._note(f"crash at {failpoint} while starting")
                failpoint = None

    @staticmethod
    def _await_server_gone(daemon: DaemonProcess) -> None:
        """Its embedded nats-server follows a dead daemon (parent-death signal): wait for that,
        so the next daemon finds the port free."""
        for pid in server_pids(daemon):
            if not wait_for_exit(pid, EXIT_TIMEOUT):
                raise AssertionError(f"nats-server {pid} outlived its daemon")

    async def start(self) -> None:
        async with self._lock:
            self.daemon, _ = await asyncio.to_thread(self._start, None)

    async def fired(self, timeout: float = FIRE_TIMEOUT) -> None:
        """Wait (the load going on) until the armed failpoint, if any, has fired."""
        try:
            await asyncio.wait_for(self._fired.wait(), timeout)
        except asyncio.TimeoutError:
            self._note(f"{self.armed} not reached in {timeout:.0f}s")

    async def kill(self) -> None:
        async with self._lock:
            await self._recover()
            daemon = self._current()
            self._note("kill -9 of the daemon")
            daemon.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(daemon.process.wait, EXIT_TIMEOUT)
            await self._replace(daemon, None)
            self.counts.kills += 1

    async def arm(self, failpoint: str) -> None:
        """Restart the daemon (SIGTERM: it finishes its in-flight work) with ``failpoint`` armed."""
        async with self._lock:
            await self._recover()
            self._note(f"restart with {failpoint}")
            await self._replace(self._current(), failpoint)
            self.counts.failpoints_armed += 1

    async def disarm(self) -> None:
        """Give an armed failpoint its time to fire, then take it off if it did not (a plain
        restart), so that nothing crashes while the audit reads."""
        await self.fired()
        async with self._lock:
            await self._recover()
            if self.armed is not None:
                self._note(f"restart without {self.armed}")
                await self._replace(self._current(), None)

    async def restart_nats(self) -> None:
        async with self._lock:
            await self._recover()
            daemon = self._current()
            pids = server_pids(daemon)
            self._note("kill -9 of nats-server")
            os.kill(pids[-1], signal.SIGKILL)
            deadline = time.monotonic() + EXIT_TIMEOUT
            while len(server_pids(daemon)) == len(pids):  # the daemon logs each server it starts
                if time.monotonic() > deadline:
                    raise AssertionError("the daemon did not start its nats-server again")
                await asyncio.sleep(0.1)
            self.counts.nats_restarts += 1

    async def watch(self) -> None:
        """Restart the daemon whenever it exits by itself: at its failpoint (counted) or not
        (an unexpected exit, reported)."""
        while not self._stopping:
            daemon = self._current()
            if not await asyncio.to_thread(wait_for_exit, daemon.process.pid, 1.0):
                continue
            async with self._lock:
                if daemon is self.daemon:
                    await self._recover()

    async def stop(self, watcher: asyncio.Task[None] | None) -> None:
        async with self._lock:
            self._stopping = True
            if self.daemon is not None:
                await asyncio.to_thread(self.daemon.stop)
        if watcher is not None:
            await watcher

    async def _recover(self) -> None:
        """If the daemon has exited by itself, say why and start another (the lock is held)."""
        daemon = self._current()
        code = daemon.process.poll()
        if code is None or self._stopping:
            return
        if code == CRASH_EXIT_CODE and self.armed is not None:
            self.counts.failpoint_crashes += 1
            self._note(f"crash at {self.armed}")
        else:
            self.counts.unexpected_exits.append(f"{daemon.log_path.name}: exit {code}")
            self._note(f"unexpected exit {code}")
        await self._replace(daemon, None)

    async def _replace(self, daemon: DaemonProcess, failpoint: str | None) -> None:
        """Stop ``daemon`` (SIGTERM if it still runs), wait for its nats-server to go, start another."""
        await asyncio.to_thread(daemon.stop)
        await asyncio.to_thread(self._await_server_gone, daemon)
        self.daemon, self.armed = await asyncio.to_thread(self._start, failpoint)
        if self.armed is None:
            self._fired.set()
        else:
            self._fired.clear()

    def _current(self) -> DaemonProcess:
        assert self.daemon is not None, "no daemon started"
        return self.daemon


def server_pids(daemon: DaemonProcess) -> list[int]:
    return [e["pid"] for e in daemon.logs() if e.get("event") == "nats-server started"]


def needs_bad_input(arming: str) -> bool:
    return arming.partition("=")[0] in RARE_POINTS


async def chaos(plan: Plan, supervisor: Supervisor, progress: Progress, armings: list[str],
                throw_bad_input: Callable[[], Awaitable[None]]) -> None:
    """Each fault at its own point of the load (a number of commands acknowledged), drawn from a
    seeded RNG. After arming a failpoint, the next fault waits until it has fired (a point only
    a malformed command reaches gets one thrown in). The load pauses while a fault restarts the
    daemon, and goes on until every fault is made (see ``Progress``)."""
    rng = random.Random(plan.seed + 1)
    faults: list[tuple[str, str | None]] = [("kill", None)] * plan.kills + [("nats", None)] * plan.nats_restarts
    faults += [("failpoint", arming) for arming in armings]
    rng.shuffle(faults)
    at = sorted(rng.uniform(FIRST, LAST) * plan.commands for _ in faults)
    try:
        for when, (fault, arming) in zip(at, faults):
            if not await progress.reached(when):
                return
            async with progress.pause():
                if fault == "kill":
                    await supervisor.kill()
                elif fault == "nats":
                    await supervisor.restart_nats()
                else:
                    assert arming is not None
                    await supervisor.arm(arming)
            if arming is not None and needs_bad_input(arming):
                await throw_bad_input()
            await supervisor.fired()  # the load goes on until the failpoint, if one was armed, fires
    finally:
        await progress.all_faults_made()
