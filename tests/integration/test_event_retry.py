"""A dead event goes back to the one handler that failed it, once, and to nobody else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import (
    client,
    daemon,
    events_of_stream,
    eventually,
    example_manifest,
    kv_json,
    nats_server,
    result,
    send,
)

pytestmark = pytest.mark.integration

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "app.yaml"


async def test_retried_dead_event_reaches_only_its_handler(example_components, tmp_path):
    with nats_server(tmp_path) as server, daemon(example_manifest(tmp_path, {"NAME: bankaccount_projector": "MAX_DELIVERIES: 2"}), tmp_path / "d.log",
                                                 "--nats-url", server.url):
        async with client(server.url) as nc:
            # a deposit the projector cannot place: it knows no account GHOST yet
            await nc.jetstream().publish("cc.events.funds_deposited.elsewhere.GHOST", json.dumps({
                "specversion": "1.0", "id": "ghost-1", "type": "funds_deposited", "source": "test",
                "time": "2026-01-01T00:00:00Z", "x-concordance-stream": "elsewhere",
                "data": {"accountNumber": "GHOST", "amount": 25, "customerId": "C"}}).encode())

            async def letters():
                return await events_of_stream(nc, "CC_DEADLETTER", "cc.deadletter.PROJ_bankaccount_projector")

            (letter,) = await eventually(letters, bool)
            assert "unknown account GHOST" in letter["reason"]
            await result(nc, await send(nc, "bankaccount", {"command_type": "create_account", "key": "GHOST",
                         "data": {"accountNumber": "GHOST", "initialBalance": 100, "customerId": "C"}}))
            balance = lambda: kv_json(nc, "CC_RM_bankaccount_projector", "balance.GHOST")  # noqa: E731
            assert (await eventually(balance, lambda b: b and b["balance"] == 100))["balance"] == 100

            listed = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "deadletters", "list",
                                     "--nats-url", server.url], capture_output=True, text=True, timeout=60)
            dead_seq = listed.stdout.split("\t", 1)[0]
            retried = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "deadletters", "retry",
                                      dead_seq, "--nats-url", server.url], capture_output=True, text=True, timeout=60)
            assert retried.returncode == 0, retried.stderr
            assert "cc.events.funds_deposited.elsewhere.GHOST.retry" in retried.stdout

            assert (await eventually(balance, lambda b: b["balance"] == 125))["balance"] == 125
            assert await letters() == []
            # the aggregate never folds a retried copy
            assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.GHOST"))["balance"] == 100
