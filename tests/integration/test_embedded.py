"""The embedded default: `concordance up` starts its own NATS, keeps data, stops cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from concordance_provider.nats_server import free_port

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
