"""Real processes for integration tests: nats-server and the daemon, each stopped by its PID."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import nats
from nats.aio.client import Client as NATS

from concordance_provider.naming import command_subject
from concordance_provider.nats_server import EmbeddedNatsServer, free_port, server_binary
from concordance_provider.store.results import read_result

READY_TIMEOUT = 120.0
EXAMPLE_MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "app.yaml"


def example_manifest(folder: Path, additions: dict[str, str]) -> Path:
    """The bank example's manifest, usable from ``folder``, with a link value added after each
    line named in ``additions`` (e.g. ``{"NAME: bankaccount_projector": "MAX_DELIVERIES: 2"}``)."""
    text = EXAMPLE_MANIFEST.read_text().replace("file://./build/", f"file://{EXAMPLE_MANIFEST.parent}/build/")
    text = text.replace("source: ./", f"source: {EXAMPLE_MANIFEST.parent}/")
    for anchor, value in additions.items():  # the value is indented as its anchor line is
        text = re.sub(rf"^( *){re.escape(anchor)}\n", lambda m: f"{m.group(0)}{m.group(1)}{value}\n", text, flags=re.M)
    path = folder / "app.yaml"
    path.write_text(text)
    return path


@contextmanager
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    server = EmbeddedNatsServer(tmp_path / "nats", free_port(), name=f"test-{os.getpid()}")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def configured_nats_server(config: Path, port: int, log: Path | None = None) -> Iterator[subprocess.Popen]:
    """nats-server run with its own configuration file (auth, TLS, permissions), listening on
    127.0.0.1:``port``; stopped by its PID."""
    output = ["-l", str(log)] if log else []
    process = subprocess.Popen([server_binary(), "-c", str(config), *output], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert process.poll() is None, f"nats-server refused its configuration:\n{config.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)  # polling, bounded by the deadline
        else:
            raise AssertionError(f"nats-server did not listen on port {port} within 15s")
        yield process
    finally:
        process.terminate()
        process.wait(10)


class DaemonProcess:
    """``concordance up`` as a user runs it, logging JSON to a file."""

    def __init__(self, manifest: Path | None, log_path: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [sys.executable, "-m", "concordance_provider.cli", "up", *([str(manifest)] if manifest else []),
                   "--log-format", "json", *args]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
        return lines

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            if any(entry.get("event") == "concordance ready" for entry in self.logs()):
                return
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready in {timeout}s:\n{self.log_path.read_text()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


async def logged(process: "DaemonProcess", event: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Wait until the process has logged ``event`` at least ``count`` times; return those entries."""
    deadline = time.monotonic() + timeout
    while True:
        found = [entry for entry in process.logs() if entry.get("event") == event]
        if len(found) >= count:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"{event!r} logged {len(found)} of {count} times in {timeout}s:\n"
                                 f"{process.log_path.read_text()[-3000:]}")
        await asyncio.sleep(0.1)


@contextmanager
def daemon(manifest: Path | None, log_path: Path, *args: str) -> Iterator[DaemonProcess]:
    process = DaemonProcess(manifest, log_path, *args)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@asynccontextmanager
async def client(url: str) -> AsyncIterator[NATS]:
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.close()


async def send(nc: NATS, aggregate: str, body: Any, key: str | None = None) -> int:
    """Send a command exactly as any NATS client would (on ``cc.commands.{aggregate}.{key}`` when
    ``key`` is given); return its CC_COMMANDS sequence."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = await nc.request(command_subject(aggregate, key), data, timeout=5)
    ack = json.loads(reply.data)
    assert ack.get("stream") == "CC_COMMANDS", ack
    return int(ack["seq"])


async def result(nc: NATS, seq: int, timeout: float = 30.0, *, aggregate: str | None = None,
                 key: str | None = None) -> dict[str, Any]:
    """Command ``seq``'s outcome in CC_RESULTS, waited for up to ``timeout`` seconds (read by seq
    alone, or exactly under ``{aggregate}.{key}.{seq}`` when ``aggregate`` is given)."""
    outcome = await read_result(nc, seq, aggregate=aggregate, key=key, wait=timeout)
    if outcome is None:
        raise AssertionError(f"no result for command {seq} within {timeout}s")
    return json.loads(outcome)


async def kv_json(nc: NATS, bucket: str, key: str) -> Any:
    kv = await nc.jetstream().key_value(bucket)
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    return json.loads(entry.value) if entry.value else None


async def ledger(nc: NATS, account: str) -> list[dict[str, Any]]:
    """The projector's ledger of one account, in order."""
    bucket = "CC_RM_bankaccount_projector"
    js = nc.jetstream()
    # The stream's subject list, not KeyValue.keys(): nats-py's keys() can end before the first
    # key when the server delivers everything before its consumer info returns.
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}ledger.{account}.>")
    kv = await js.key_value(bucket)
    keys = sorted(subject[len(prefix):] for subject in (info.state.subjects or {}))
    return [json.loads((await kv.get(k)).value) for k in keys]


async def eventually(probe, expected: Any, timeout: float = 30.0) -> Any:
    """Poll ``probe()`` until it returns ``expected`` (or a value ``expected`` accepts, if it is
    callable); return the last value seen."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = await probe()
        if (expected(value) if callable(expected) else value == expected):
            return value
        await asyncio.sleep(0.1)
    return value


async def quiescent(nc: NATS, streams: tuple[str, ...] = ("CC_COMMANDS", "CC_EVENTS"),
                    timeout: float = 60.0) -> None:
    """Wait until nothing is in flight: every durable consumer of ``streams`` has nothing pending
    and nothing unacknowledged, and no stream grew while that was being checked. Workers publish
    what a message causes before they ack it, so a chain of effects is never caught halfway."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    busy: list[str] = []
    while time.monotonic() < deadline:
        before = [(await js.stream_info(s)).state.last_seq for s in streams]
        busy = [f"{info.name}: pending {info.num_pending}, ack pending {info.num_ack_pending}"
                for s in streams for info in await js.consumers_info(s)
                if info.config.durable_name and (info.num_pending or info.num_ack_pending)]
        after = [(await js.stream_info(s)).state.last_seq for s in streams]
        if not busy and before == after:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"still busy after {timeout}s: {busy}")


async def events_of_stream(nc: NATS, stream: str, subject: str) -> list[dict[str, Any]]:
    return [body for _, body in await events(nc, subject, stream)]


async def events(nc: NATS, subject: str = "cc.events.>",
                 stream: str = "CC_EVENTS") -> list[tuple[str, dict[str, Any]]]:
    """Every stored message matching ``subject``, read with an ordinary ordered consumer."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    found: list[tuple[str, dict[str, Any]]] = []
    if info.state.messages == 0:
        return found
    sub = await js.subscribe(subject, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                return found
            try:
                found.append((msg.subject, json.loads(msg.data)))
            except ValueError:
                pass  # not JSON: some tests publish garbage on purpose
            if msg.metadata.num_pending == 0:
                return found
    finally:
        await sub.unsubscribe()


def host_data_line(nats_url: str, lattice: str, provider_key: str, links: list[dict[str, Any]],
                   **fields: Any) -> bytes:
    """The line a wasmCloud 1.x host writes to a provider's stdin: base64 JSON HostData, CRLF."""
    host_data = {
        "host_id": "NHOSTTEST", "lattice_rpc_prefix": lattice, "link_name": "default",
        "lattice_rpc_user_jwt": "", "lattice_rpc_user_seed": "", "lattice_rpc_url": nats_url,
        "provider_key": provider_key, "env_values": {}, "instance_id": "test-instance",
        "link_definitions": links, "cluster_issuers": [], "config": {}, "secrets": {},
        "host_xkey_public_key": "", "provider_xkey_private_key": "", "default_rpc_timeout_ms": 2000,
        "structured_logging": True, "log_level": "info", "otel_config": {}, **fields,
    }
    return base64.b64encode(json.dumps(host_data).encode()) + b"\r\n"


class ProviderProcess:
    """``concordance provider`` started as a wasmCloud host starts a provider: an empty
    environment and the HostData line on stdin."""

    def __init__(self, line: bytes, log_path: Path, command: list[str] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(command or [sys.executable, "-m", "concordance_provider.cli", "provider"],
                                        stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={}, cwd=str(log_path.parent))
        assert self.process.stdin is not None
        self.process.stdin.write(line)
        self.process.stdin.close()

    def logs(self) -> list[dict[str, Any]]:
        return DaemonProcess.logs(self)  # type: ignore[arg-type]

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        DaemonProcess.wait_ready(self, timeout)  # type: ignore[arg-type]

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()
