"""The embedded default: `concordance up` starts its own NATS, keeps data, stops cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from concordance_provider.nats_server import EmbeddedNatsServer, PortInUse, StateDirInUse, free_port, port_in_use

from .harness import DaemonProcess, client, events, kv_json, result, send

pytestmark = pytest.mark.integration

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "app.yaml"


def _deposit(key: str, amount: int) -> dict:
    return {"command_type": "deposit_funds", "key": key,
            "data": {"accountNumber": key, "amount": amount, "customerId": "C"}}


async def test_embedded_server_keeps_events_across_a_restart(example_components, tmp_path):
    port = free_port()
    args = ("--state-dir", str(tmp_path / "state"), "--port", str(port))
    url = f"nats://127.0.0.1:{port}"
    first = DaemonProcess(MANIFEST, tmp_path / "first.log", *args)
    try:
        first.wait_ready()
        async with client(url) as nc:
            await result(nc, await send(nc, "bankaccount", {"command_type": "create_account", "key": "EMB",
                         "data": {"accountNumber": "EMB", "initialBalance": 10, "customerId": "C"}}))
            await result(nc, await send(nc, "bankaccount", _deposit("EMB", 5)))
    finally:
        assert first.stop() == 0  # SIGTERM: clean exit
    assert any(e.get("event") == "nats-server stopped" for e in first.logs())

    second = DaemonProcess(MANIFEST, tmp_path / "second.log", *args)
    try:
        second.wait_ready()
        async with client(url) as nc:
            assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.EMB"))["balance"] == 15
            assert (await result(nc, await send(nc, "bankaccount", _deposit("EMB", 1))))["status"] == "accepted"
            assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.EMB"))["balance"] == 16
            assert len(await events(nc, "cc.events.*.bankaccount.EMB")) == 3
    finally:
        assert second.stop() == 0


async def test_sigterm_stops_every_component_at_once_within_a_second_or_two(example_components, tmp_path):
    # Ctrl-C on `make run`: the example's four components stop together, each between messages, and
    # its nats-server after them; one after another, each waiting out an idle fetch, took 3.6 s
    port = free_port()
    daemon = DaemonProcess(MANIFEST, tmp_path / "daemon.log", "--state-dir", str(tmp_path / "state"),
                           "--port", str(port))
    try:
        daemon.wait_ready()
        await asyncio.sleep(1.5)  # every consumer idle in a fetch
        started = time.monotonic()
    finally:
        assert daemon.stop() == 0
    took = time.monotonic() - started
    unlinked = [e for e in daemon.logs() if e.get("event") == "component unlinked"]
    assert len(unlinked) == 4
    assert took < 2.0, f"the stop took {took:.1f}s"


async def test_kill_9_mid_load_loses_and_doubles_nothing(example_components, tmp_path):
    """Commands in flight when the daemon dies are finished, once, by the next daemon."""
    port = free_port()
    args = ("--state-dir", str(tmp_path / "state"), "--port", str(port))
    url = f"nats://127.0.0.1:{port}"
    keys = [f"K9-{i}" for i in range(5)]
    first = DaemonProcess(MANIFEST, tmp_path / "first.log", *args)
    first.wait_ready()
    server_pid = next(e["pid"] for e in first.logs() if e.get("event") == "nats-server started")
    try:
        async with client(url) as nc:
            for key in keys:
                await result(nc, await send(nc, "bankaccount", {"command_type": "create_account", "key": key,
                             "data": {"accountNumber": key, "initialBalance": 0, "customerId": "C"}}))
            seqs = await asyncio.gather(*(send(nc, "bankaccount", _deposit(k, 1)) for k in keys for _ in range(40)))
            await result(nc, seqs[20])
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        assert await _gone(server_pid), "the embedded nats-server outlived its daemon"
    finally:
        first.stop()
        if not await _gone(server_pid, timeout=0):
            os.kill(server_pid, signal.SIGTERM)

    second = DaemonProcess(MANIFEST, tmp_path / "second.log", *args)
    try:
        second.wait_ready()
        async with client(url) as nc:
            outcomes = [await result(nc, seq, timeout=90) for seq in seqs]
            assert all(o["status"] == "accepted" for o in outcomes)
            for key in keys:
                deposits = [e for _, e in await events(nc, f"cc.events.funds_deposited.bankaccount.{key}")]
                assert len(deposits) == 40, key
                assert (await kv_json(nc, "CC_STATE", f"agg.bankaccount.{key}"))["balance"] == 40
    finally:
        second.stop()


async def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("kind: [unclosed", "not valid YAML"),
    ("apiVersion: v1\nkind: Pod\n", "kind: Application"),
])
def test_cli_explains_a_bad_manifest(tmp_path, content, message):
    manifest = tmp_path / "app.yaml"
    if content is not None:
        manifest.write_text(content)
    done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "up", str(manifest)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr


async def test_incompatible_existing_stream_is_refused_clearly(example_components, tmp_path):
    """A CC_EVENTS left by the original provider (subjects cc.events.*) is not silently reused."""
    from .harness import nats_server

    with nats_server(tmp_path) as server:
        async with client(server.url) as nc:
            await nc.jetstream().add_stream(name="CC_EVENTS", subjects=["cc.events.*"])
        done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "up", str(MANIFEST),
                               "--nats-url", server.url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "stream CC_EVENTS exists with an incompatible configuration" in done.stderr
    assert "cc.events.>" in done.stderr


def _up(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "up", str(MANIFEST), *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    return done, time.monotonic() - started


async def test_a_second_up_on_a_busy_port_or_state_dir_is_refused_and_the_first_serves_on(
        example_components, tmp_path):
    port, other_port = free_port(), free_port()
    state = tmp_path / "state"
    url = f"nats://127.0.0.1:{port}"
    first = DaemonProcess(MANIFEST, tmp_path / "first.log", "--state-dir", str(state), "--port", str(port))
    try:
        first.wait_ready()
        async with client(url) as nc:
            await result(nc, await send(nc, "bankaccount", {"command_type": "create_account", "key": "BUSY",
                         "data": {"accountNumber": "BUSY", "initialBalance": 10, "customerId": "C"}}))

        # as `make run` twice: the same port and the same state directory
        same, took = _up("--state-dir", str(state), "--port", str(port))
        assert same.returncode == 2 and took < 10, (took, same.stderr)
        assert f"state directory {state} is in use" in same.stderr
        assert f"--nats-url {url}" in same.stderr and "--port" in same.stderr

        # another state directory, the same port: refused before anything is written there
        elsewhere = tmp_path / "elsewhere"
        busy_port, took = _up("--state-dir", str(elsewhere), "--port", str(port))
        assert busy_port.returncode == 2 and took < 10, (took, busy_port.stderr)
        assert f"port {port} on 127.0.0.1 is already in use" in busy_port.stderr
        assert "--port" in busy_port.stderr and f"--nats-url {url}" in busy_port.stderr
        assert not (elsewhere / "jetstream").exists()

        # the same state directory, another port: no second server on that data
        busy_dir, took = _up("--state-dir", str(state), "--port", str(other_port))
        assert busy_dir.returncode == 2 and took < 10, (took, busy_dir.stderr)
        assert f"state directory {state} is in use" in busy_dir.stderr
        assert not port_in_use(other_port)

        for refused in (same, busy_port, busy_dir):
            assert refused.stderr.count("error:") == 1 and "Traceback" not in refused.stderr
        async with client(url) as nc:  # the first daemon and its data are as they were
            assert (await result(nc, await send(nc, "bankaccount", _deposit("BUSY", 5))))["status"] == "accepted"
            assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.BUSY"))["balance"] == 15
        assert first.process.poll() is None
        assert not [e for e in first.logs() if e.get("event") == "nats-server exited; starting it again"]
        assert len([e for e in first.logs() if e.get("event") == "nats-server started"]) == 1
    finally:
        assert first.stop() == 0


def test_two_embedded_servers_never_share_a_state_directory(tmp_path):
    first = EmbeddedNatsServer(tmp_path / "state", free_port(), name="first")
    second = EmbeddedNatsServer(tmp_path / "state", free_port(), name="second")
    first.start()
    try:
        with pytest.raises(StateDirInUse, match=f"NATS server on port {first.port}"):
            second.start()
        assert not second.running and not port_in_use(second.port)
    finally:
        first.stop()
    second.start()  # the directory is free once its server stopped
    try:
        assert second.running
    finally:
        second.stop()


def _environment_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


@pytest.mark.parametrize("given", [None, "2"])
def test_the_embedded_server_runs_on_half_the_cores_unless_told_otherwise(tmp_path, monkeypatch, given):
    """Go's idle processors spin for work: the server gets half the cores (at least one) beside the
    daemon's own processes; a GOMAXPROCS in the environment wins."""
    if given is None:
        monkeypatch.delenv("GOMAXPROCS", raising=False)
    else:
        monkeypatch.setenv("GOMAXPROCS", given)
    server = EmbeddedNatsServer(tmp_path / "state", free_port())
    server.start()
    try:
        assert server._process is not None
        expected = given or str(max(1, len(os.sched_getaffinity(0)) // 2))
        assert _environment_of(server._process.pid).get("GOMAXPROCS") == expected
    finally:
        server.stop()


def test_a_server_that_cannot_bind_is_not_taken_for_the_one_that_answers(tmp_path):
    """Something else answering on the port is never taken for this daemon's own server."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = EmbeddedNatsServer(tmp_path / "state", squatter.getsockname()[1])
        with pytest.raises(PortInUse, match="--nats-url"):
            server.start()
        assert not server.running and not (tmp_path / "state" / "jetstream").exists()


def test_up_reads_nats_url_from_the_environment(tmp_path):
    from .harness import nats_server

    with nats_server(tmp_path) as server:
        process = DaemonProcess(None, tmp_path / "d.log", "--lattice", "env", "--state-dir", str(tmp_path / "state"),
                                env={"NATS_URL": server.url})
        try:
            process.wait_ready()
            ready = next(e for e in process.logs() if e.get("event") == "concordance ready")
            assert ready["nats"] == server.url
            assert not [e for e in process.logs() if e.get("event") == "nats-server started"]
        finally:
            assert process.stop() == 0
