"""Prometheus metrics at /metrics on the health port, scraped over real HTTP while commands flow,
and checked against what was sent."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from concordance_provider.nats_server import free_port

from .harness import DaemonProcess, client, logged, quiescent, result, send

pytestmark = pytest.mark.integration

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "app.yaml"
ACCOUNTS = [f"MET{i}" for i in range(4)]
DEPOSITS = 15  # per account
OVERDRAWN = 6  # withdrawals refused by the aggregate
MALFORMED = [b"not json", b'{"command_type": "deposit_funds", "key": "MET0"}', b'{"key": "a.>"}']

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        content_type = reply.headers["Content-Type"]
        text = reply.read().decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return content_type, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _counters(samples: Samples) -> Samples:
    return {k: v for k, v in samples.items() if k[0].endswith(("_total", "_count", "_sum", "_bucket"))}


async def test_metrics_count_what_was_sent_while_it_is_sent(example_components, tmp_path):
    port, health_port = free_port(), free_port()
    url = f"nats://127.0.0.1:{port}"
    process = DaemonProcess(MANIFEST, tmp_path / "d.log", "--state-dir", str(tmp_path / "state"),
                            "--port", str(port), "--health-port", str(health_port))
    try:
        process.wait_ready()
        content_type, before = scrape(health_port)
        assert content_type.startswith("text/plain; version=")
        assert value(before, "concordance_commands_total", aggregate="bankaccount", outcome="accepted") == 0
        assert value(before, "concordance_append_conflicts_total", aggregate="bankaccount") == 0
        assert value(before, "concordance_dead_letters_total", consumer="AGG_CMD_bankaccount") == 0
        assert value(before, "concordance_healthy") == 1 and value(before, "concordance_nats_connected") == 1

        async with client(url) as nc:
            for key in ACCOUNTS:
                await result(nc, await send(nc, "bankaccount", {"command_type": "create_account", "key": key, "data": {
                    "accountNumber": key, "initialBalance": 0, "customerId": "C"}}))
            scrapes: list[Samples] = []
            stop_scraping = asyncio.Event()

            async def keep_scraping() -> None:
                for _ in range(600):  # bounded: at most a minute
                    scrapes.append((await asyncio.to_thread(scrape, health_port))[1])
                    if stop_scraping.is_set():
                        return
                    await asyncio.sleep(0.1)

            scraper = asyncio.create_task(keep_scraping())
            sends = [send(nc, "bankaccount", {"command_type": "deposit_funds", "key": key, "data": {
                "accountNumber": key, "amount": 10, "customerId": "C"}}) for key in ACCOUNTS for _ in range(DEPOSITS)]
            sends += [send(nc, "bankaccount", {"command_type": "withdraw_funds", "key": ACCOUNTS[0], "data": {
                "accountNumber": ACCOUNTS[0], "amount": 10**6, "customerId": "C"}}) for _ in range(OVERDRAWN)]
            sends += [send(nc, "bankaccount", body) for body in MALFORMED]
            sends += [send(nc, "nobody_linked", {"command_type": "x", "key": "k", "data": {}})]
            seqs = await asyncio.gather(*sends)
            for seq in seqs:
                await result(nc, seq, timeout=90)
            await quiescent(nc)
            stop_scraping.set()
            await scraper

        _, after = scrape(health_port)
        assert len(scrapes) >= 2
        for earlier, later in zip(scrapes, scrapes[1:] + [after]):  # counters never go back
            assert all(later.get(k, 0) >= v for k, v in _counters(earlier).items())

        commands = len(ACCOUNTS) + len(ACCOUNTS) * DEPOSITS
        assert value(after, "concordance_commands_total", aggregate="bankaccount", outcome="accepted") == commands
        assert value(after, "concordance_commands_total", aggregate="bankaccount",
                     outcome="rejected") == OVERDRAWN + len(MALFORMED)
        assert value(after, "concordance_commands_total", aggregate="_unlinked", outcome="rejected") == 1
        assert value(after, "concordance_events_appended_total", aggregate="bankaccount",
                     event_type="account_created") == len(ACCOUNTS)
        assert value(after, "concordance_events_appended_total", aggregate="bankaccount",
                     event_type="funds_deposited") == len(ACCOUNTS) * DEPOSITS
        assert value(after, "concordance_dead_letters_total", consumer="AGG_CMD_bankaccount") == len(MALFORMED)
        assert value(after, "concordance_dead_letters_stored", consumer="AGG_CMD_bankaccount") == len(MALFORMED)

        decided = value(after, "concordance_component_call_seconds_count", component="bankaccount-aggregate",
                        function="handle-command")
        assert decided is not None and decided >= commands + OVERDRAWN  # more only if decided again
        projected = value(after, "concordance_component_call_seconds_count", component="bankaccount-projector",
                          function="apply-stateless-event")
        assert projected == commands  # one event per accepted command, each applied once
        assert value(after, "concordance_component_call_seconds_bucket", component="bankaccount-projector",
                     function="apply-stateless-event", le="+Inf") == projected
        assert value(after, "concordance_component_call_failures_total", component="bankaccount-aggregate",
                     function="handle-command") is None  # no failure, no series

        for consumer, stream in (("AGG_CMD_bankaccount", "CC_COMMANDS"), ("PROJ_bankaccount_projector", "CC_EVENTS"),
                                 ("PM_interbankxfer", "CC_EVENTS")):
            for gauge in ("pending", "ack_pending", "redelivered"):
                assert value(after, f"concordance_consumer_{gauge}", consumer=consumer, stream=stream) == 0
            assert value(after, "concordance_consumer_stuck", consumer=consumer, stream=stream) == 0
        assert value(after, "concordance_healthy") == 1
        assert value(after, "concordance_nats_reconnects_total") == 0

        # NATS goes away and comes back: one disconnect, one reconnect, healthy again
        server_pid = next(e["pid"] for e in process.logs() if e.get("event") == "nats-server started")
        os.kill(server_pid, signal.SIGKILL)
        await logged(process, "reconnected to NATS")
        _, back = scrape(health_port)
        assert value(back, "concordance_nats_disconnects_total") == 1
        assert value(back, "concordance_nats_reconnects_total") == 1
        assert value(back, "concordance_nats_connected") == 1
    finally:
        assert process.stop() == 0
