"""Two daemons racing on one account: no overdraft, no lost or doubled event."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from .harness import (
    client,
    daemon,
    events,
    example_manifest,
    kv_json,
    nats_server,
    result,
    send,
)

pytestmark = pytest.mark.integration

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "app.yaml"
WITHDRAWALS = 200
AMOUNT = 75
OPENING = 10_000  # room for 133 withdrawals of 75, not 200


async def test_200_concurrent_withdrawals_on_two_daemons_never_overdraw(example_components, tmp_path):
    # small pull batches, so both daemons get commands for the key
    manifest = example_manifest(tmp_path, {"INTEREST: bankaccount": "MAX_MESSAGES_PER_BATCH: 5"})
    with nats_server(tmp_path) as server:
        args = ("--nats-url", server.url, "--log-level", "debug")
        with daemon(manifest, tmp_path / "a.log", *args) as first, daemon(manifest, tmp_path / "b.log", *args) as second:
            async with client(server.url) as nc:
                created = await send(nc, "bankaccount", {"command_type": "create_account", "key": "RACE", "data": {
                    "accountNumber": "RACE", "initialBalance": OPENING, "minBalance": 0, "customerId": "C"}})
                assert (await result(nc, created))["status"] == "accepted"
                withdraw = {"command_type": "withdraw_funds", "key": "RACE",
                            "data": {"accountNumber": "RACE", "amount": AMOUNT, "customerId": "C"}}
                seqs = await asyncio.gather(*(send(nc, "bankaccount", withdraw) for _ in range(WITHDRAWALS)))
                outcomes = [await result(nc, seq, timeout=120) for seq in seqs]

                accepted = sum(o["status"] == "accepted" for o in outcomes)
                rejected = [o for o in outcomes if o["status"] == "rejected"]
                assert accepted == OPENING // AMOUNT
                assert all("insufficient funds" in o["error"] for o in rejected)

                log = [e for s, e in await events(nc, "cc.events.*.bankaccount.RACE")]
                withdrawn = [e for e in log if e["type"] == "funds_withdrawn"]
                assert len(withdrawn) == accepted
                assert len({e["id"] for e in log}) == len(log)
                folded = OPENING - sum(e["data"]["amount"] for e in withdrawn)
                state = await kv_json(nc, "CC_STATE", "agg.bankaccount.RACE")
                assert state["balance"] == folded >= 0
        for process in (first, second):  # both daemons decided some of the commands
            assert any(entry.get("event") == "command rejected" for entry in process.logs())
        # each daemon decided some commands after the other's, knowing it (it waited for them) or not
        # (its append met the other's and it decided again)
        raced = [e for p in (first, second) for e in p.logs() if e.get("event") in (
            "append conflict; deciding again", "earlier commands of its key were decided elsewhere; its state is read afresh")]
        assert raced, "the daemons never raced on the key: the test proved nothing"


async def test_status_shows_every_daemon(example_components, tmp_path):
    import json
    import subprocess
    import sys

    with nats_server(tmp_path) as server:
        with daemon(MANIFEST, tmp_path / "a.log", "--nats-url", server.url), \
                daemon(MANIFEST, tmp_path / "b.log", "--nats-url", server.url):
            async with client(server.url) as nc:
                await result(nc, await send(nc, "bankaccount", {"command_type": "create_account", "key": "ST1",
                             "data": {"accountNumber": "ST1", "initialBalance": 1, "customerId": "C"}}))
                await result(nc, await send(nc, "bankaccount", b"not json"))
            done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "status", "--json",
                                   "--nats-url", server.url], capture_output=True, text=True, timeout=60)
            reports = json.loads(done.stdout)
            assert len(reports) == 2 and len({r["daemon"] for r in reports}) == 2
            for report in reports:
                assert report["health"] == {"healthy": True, "message": None}
                names = {c["name"]: c for c in report["components"]}
                assert names["wiretransfer-process-manager"]["interest"]["lifetime"]["start"] == "wire_transfer_initiated"
                consumers = {c["name"]: c for c in report["consumers"]}
                assert consumers["AGG_CMD_bankaccount"]["dead_letters"] == 1
                assert consumers["AGG_CMD_bankaccount"]["pending"] == 0
            calls = sum(next(c for c in r["components"] if c["name"] == "bankaccount-aggregate")["calls"] for r in reports)
            assert calls >= 2  # handle-command and apply-event of the create
            text = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "status",
                                   "--nats-url", server.url], capture_output=True, text=True, timeout=60).stdout
            assert text.count("healthy") == 2 and "consumer PM_interbankxfer" in text
