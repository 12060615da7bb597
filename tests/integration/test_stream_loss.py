"""Streams and buckets deleted or purged from outside while the daemon serves the bank example:
records and derived state are created again, the sources of truth make it unhealthy, naming them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime

import pytest
from nats.js.errors import NotFoundError

from concordance_provider.nats_server import free_port

from .harness import EXAMPLE_MANIFEST, client, daemon, events_of_stream, kv_json, logged, nats_server, result, send

pytestmark = pytest.mark.integration

ACCOUNT = "LOSS1"
PROBE_WAIT = 30.0  # the daemon looks every 5 s; a loaded machine may take a few rounds


def _create(key: str = ACCOUNT) -> dict:
    return {"command_type": "create_account", "key": key,
            "data": {"accountNumber": key, "initialBalance": 1000, "minBalance": 0, "customerId": "C1"}}


def _deposit(amount: int, key: str = ACCOUNT) -> dict:
    return {"command_type": "deposit_funds", "key": key,
            "data": {"accountNumber": key, "amount": amount, "customerId": "C1", "note": "test"}}


def _health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def _until_health(port: int, wanted: int, says: str | None = None, timeout: float = PROBE_WAIT) -> dict:
    """Poll /health until it answers ``wanted`` with ``says`` in its message; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        status, report = await asyncio.to_thread(_health, port)
        if status == wanted and (says is None or says in (report.get("message") or "")):
            return report
        assert time.monotonic() < deadline, f"health still {status} {report} after {timeout}s"
        await asyncio.sleep(0.3)


def _status(url: str) -> str:
    done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "status", "--nats-url", url],
                          capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


async def _dead_letters(nc) -> list[dict]:
    try:
        return await events_of_stream(nc, "CC_DEADLETTER", "cc.deadletter.>")
    except NotFoundError:  # not made again yet
        return []


async def _balance(nc, key: str = ACCOUNT) -> int:
    return (await kv_json(nc, "CC_STATE", f"agg.bankaccount.{key}"))["balance"]


async def test_dead_letters_outcomes_and_state_deleted_from_outside_are_created_again(example_components, tmp_path):
    health_port = free_port()
    with nats_server(tmp_path) as server, daemon(EXAMPLE_MANIFEST, tmp_path / "d.log", "--nats-url", server.url,
                                                 "--health-port", str(health_port)) as process:
        async with client(server.url) as nc:
            js = nc.jetstream()
            assert (await result(nc, await send(nc, "bankaccount", _create())))["status"] == "accepted"
            for name in ("CC_DEADLETTER", "KV_CC_RESULTS", "KV_CC_STATE"):
                await js.delete_stream(name)

            # A message no delivery can handle is stored as a dead letter in a stream made again
            garbage = await js.publish(f"cc.events.funds_deposited.bankaccount.{ACCOUNT}", b"not an event")
            deadline = time.monotonic() + PROBE_WAIT
            while not [d for d in await _dead_letters(nc) if d["stream_seq"] == garbage.seq]:
                assert time.monotonic() < deadline, "no dead letter stored"
                await asyncio.sleep(0.3)

            # Outcomes and state: the buckets are made again, the balance refolded from the log
            created = await logged(process, "stream was missing; created again", count=3, timeout=PROBE_WAIT)
            assert {entry["stream"] for entry in created} == {"CC_DEADLETTER", "KV_CC_RESULTS", "KV_CC_STATE"}
            seq = await send(nc, "bankaccount", _deposit(250))
            assert (await result(nc, seq, timeout=PROBE_WAIT))["status"] == "accepted"
            assert await _balance(nc) == 1250
            report = await _until_health(health_port, 200)
            assert report == {"healthy": True, "message": None}
        # the store of a dead letter was never retried without end
        retried = [e for e in process.logs() if e.get("event") == "could not store dead letter; will retry"]
        assert len(retried) <= 2, retried
        assert process.process.poll() is None


@pytest.mark.parametrize("lost, says", [
    ("KV_CC_RM_bankaccount_projector", "read-model bucket CC_RM_bankaccount_projector is missing"),
    ("CC_EVENTS", "stream CC_EVENTS is missing"),
    ("CC_COMMANDS", "stream CC_COMMANDS is missing"),
])
async def test_a_lost_source_of_truth_or_read_model_makes_the_daemon_unhealthy_naming_it(
        example_components, tmp_path, lost, says):
    health_port = free_port()
    with nats_server(tmp_path) as server, daemon(EXAMPLE_MANIFEST, tmp_path / "d.log", "--nats-url", server.url,
                                                 "--health-port", str(health_port)) as process:
        async with client(server.url) as nc:
            js = nc.jetstream()
            assert (await result(nc, await send(nc, "bankaccount", _create())))["status"] == "accepted"
            await _until_health(health_port, 200)
            await js.delete_stream(lost)
            report = await _until_health(health_port, 503, says)
            assert report["healthy"] is False
            shown = await asyncio.to_thread(_status, server.url)
            assert "UNHEALTHY" in shown and says in shown, shown
            (entry,) = await logged(process, "stream lost")
            assert says in entry["problem"]
            # not created again behind the operator's back: an empty one would be taken for the real one
            assert lost not in [info.config.name for info in await js.streams_info()]
            assert process.process.poll() is None
            if lost.startswith("KV_CC_RM_"):  # replay makes the read model again, from the log
                replay = await asyncio.to_thread(
                    subprocess.run, [sys.executable, "-m", "concordance_provider.cli", "replay", str(EXAMPLE_MANIFEST),
                                     "bankaccount_projector", "--nats-url", server.url],
                    capture_output=True, text=True, timeout=120)
                assert replay.returncode == 0, replay.stderr
                assert await _until_health(health_port, 200) == {"healthy": True, "message": None}
                rebuilt = await kv_json(nc, "CC_RM_bankaccount_projector", f"balance.{ACCOUNT}")
                assert rebuilt["balance"] == 1000, rebuilt
                await logged(process, "stream back")
        rate = _lines_per_second(process)
        assert rate <= 10, f"{rate} log lines a second while {lost} is missing"


def _lines_per_second(process, window: float = 5.0) -> float:
    """Log lines a second over the last ``window`` seconds logged: a retry without pause floods it."""
    times = [datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
             for entry in process.logs() if "timestamp" in entry]
    return len([t for t in times if t > times[-1] - window]) / window


async def test_events_purged_from_outside_are_reported_while_the_daemon_stays_healthy(example_components, tmp_path):
    health_port = free_port()
    with nats_server(tmp_path) as server, daemon(EXAMPLE_MANIFEST, tmp_path / "d.log", "--nats-url", server.url,
                                                 "--health-port", str(health_port)) as process:
        async with client(server.url) as nc:
            js = nc.jetstream()
            assert (await result(nc, await send(nc, "bankaccount", _create())))["status"] == "accepted"
            assert (await result(nc, await send(nc, "bankaccount", _deposit(5))))["status"] == "accepted"
            await js.purge_stream("CC_EVENTS")
            report = await _until_health(health_port, 200, "event(s) were removed from CC_EVENTS")
            assert report["message"].startswith("2 event(s) were removed from CC_EVENTS from outside")
            (entry,) = await logged(process, "events removed from the log")
            assert entry["removed"] == 2
            # the state still holds what the log no longer has; new instances are decided as before
            assert await _balance(nc) == 1005
            outcome = await result(nc, await send(nc, "bankaccount", _create("LOSS2")))
            assert outcome["status"] == "accepted", outcome
            shown = await asyncio.to_thread(_status, server.url)
            assert "2 event(s) were removed from CC_EVENTS" in shown, shown


def test_dead_letter_commands_say_when_their_stream_is_missing(tmp_path):
    with nats_server(tmp_path) as server:
        for command in (["list"], ["show", "1"], ["retry", "1"], ["purge", "--yes"]):
            done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "deadletters", *command,
                                   "--nats-url", server.url], capture_output=True, text=True, timeout=60)
            assert done.returncode == 2, done.stderr
            assert done.stderr.startswith("error: stream CC_DEADLETTER does not exist: no daemon has used this "
                                          "server yet, or it was deleted"), done.stderr
