"""NATS goes away under load and comes back: the daemon reconnects and nothing is lost."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

from concordance_provider.nats_server import EmbeddedNatsServer, free_port

from .harness import DaemonProcess, client, daemon, events, kv_json, logged, result, send

pytestmark = pytest.mark.integration

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "app.yaml"
KEYS = [f"OUT-{i}" for i in range(4)]
DEPOSITS = 30


def _create(key: str) -> dict:
    return {"command_type": "create_account", "key": key,
            "data": {"accountNumber": key, "initialBalance": 0, "customerId": "C"}}


def _deposit(key: str) -> dict:
    return {"command_type": "deposit_funds", "key": key,
            "data": {"accountNumber": key, "amount": 1, "customerId": "C"}}


async def _load(url: str) -> list[int]:
    async with client(url) as nc:
        for key in KEYS:
            await send(nc, "bankaccount", _create(key))
        return list(await asyncio.gather(*(send(nc, "bankaccount", _deposit(k)) for k in KEYS for _ in range(DEPOSITS))))


async def _all_done(url: str, seqs: list[int]) -> None:
    async with client(url) as nc:
        outcomes = [await result(nc, seq, timeout=90) for seq in seqs]
        assert [o for o in outcomes if o["status"] != "accepted"] == []
        for key in KEYS:
            deposits = await events(nc, f"cc.events.funds_deposited.bankaccount.{key}")
            assert len(deposits) == DEPOSITS
            assert (await kv_json(nc, "CC_STATE", f"agg.bankaccount.{key}"))["balance"] == DEPOSITS


async def test_external_server_restart_during_load(example_components, tmp_path):
    server = EmbeddedNatsServer(tmp_path / "nats", free_port(), name="outage")
    server.start()
    try:
        with daemon(MANIFEST, tmp_path / "d.log", "--nats-url", server.url) as process:
            seqs = await _load(server.url)
            server.stop()
            await logged(process, "disconnected from NATS; reconnecting")
            assert process.process.poll() is None  # NATS away: the daemon waits, it does not crash
            server.start()
            await _all_done(server.url, seqs)
            assert any(e.get("event") == "reconnected to NATS" for e in process.logs())
    finally:
        server.stop()


async def test_embedded_server_is_restarted_when_it_dies(example_components, tmp_path):
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    process = DaemonProcess(MANIFEST, tmp_path / "d.log", "--state-dir", str(tmp_path / "state"), "--port", str(port))
    try:
        process.wait_ready()
        server_pid = next(e["pid"] for e in process.logs() if e.get("event") == "nats-server started")
        seqs = await _load(url)
        os.kill(server_pid, signal.SIGKILL)
        await logged(process, "nats-server exited; starting it again")
        restarted = (await logged(process, "nats-server started", count=2))[1]
        assert restarted["pid"] != server_pid
        await _all_done(url, seqs)
    finally:
        assert process.stop() == 0


def _health(port: int) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_health_is_unhealthy_while_nats_is_away(example_components, tmp_path):
    server = EmbeddedNatsServer(tmp_path / "nats", free_port(), name="health")
    health_port = free_port()
    server.start()
    try:
        with daemon(MANIFEST, tmp_path / "d.log", "--nats-url", server.url, "--health-port", str(health_port)) as process:
            assert await _until_health(health_port, 200)
            server.stop()
            status, report = await _until_health(health_port, 503)
            assert report["healthy"] is False and "NATS" in report["message"]
            assert process.process.poll() is None
            server.start()
            status, report = await _until_health(health_port, 200)
            assert report == {"healthy": True, "message": None}
    finally:
        server.stop()


async def _until_health(port: int, wanted: int, timeout: float = 30) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    while True:
        status, report = await asyncio.to_thread(_health, port)
        if status == wanted or time.monotonic() > deadline:
            assert status == wanted, report
            return status, report
        await asyncio.sleep(0.3)


async def test_sigterm_stops_a_daemon_still_waiting_for_its_server(example_components, tmp_path):
    """A daemon started before its NATS server is up stops at once when asked, and says so."""
    waiting = DaemonProcess(MANIFEST, tmp_path / "waiting.log", "--nats-url", f"nats://127.0.0.1:{free_port()}")
    try:
        await logged(waiting, "NATS error", count=1, timeout=60)
        waiting.process.send_signal(signal.SIGTERM)
        assert waiting.process.wait(timeout=10) == 0
    finally:
        waiting.stop()
    assert "concordance stopped before NATS was reached" in waiting.log_path.read_text()
