"""A dead event goes back to the one handler that failed it, once, and to nobody else.

The bank example runs with a second link of its projector, ``late_projector``, interested in
``funds_deposited`` and ``wire_transfer_initiated`` but not in ``account_created``: it knows no
account, so it fails both events of the bankaccount stream and they become its dead letters.
Every other handler of those types has applied them already: the bank projector the deposit, the
wire-transfer process manager and the other bank's gateway the transfer. Retried, the events must
reach the late projector alone: a handler that took a retried copy as new would apply the deposit
twice, start the transfer again (reserve, answer, commit) and so change the aggregate's state.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .harness import (
    client,
    daemon,
    events,
    events_of_stream,
    eventually,
    example_manifest,
    kv_json,
    ledger,
    nats_server,
    quiescent,
    result,
    send,
)

pytestmark = pytest.mark.integration

LATE = "late_projector"
LATE_CONSUMER = f"PROJ_{LATE}"
LATE_BUCKET = f"CC_RM_{LATE}"
ACCOUNT, TRANSFER = "RETRY1", "WT-RETRY1"


def _manifest(folder: Path) -> Path:
    """The bank example, plus its projector linked a second time under another name."""
    path = example_manifest(folder, {})
    doc = yaml.safe_load(path.read_text())
    components = doc["spec"]["components"]
    projector = next(c for c in components if c["name"] == "bankaccount-projector")
    late = json.loads(json.dumps(projector))
    late["name"] = "late-projector"
    late["traits"][0]["properties"]["target"]["config"] = [{"name": "late-projector-link", "properties": {
        "ROLE": "projector", "NAME": LATE, "INTEREST": "funds_deposited,wire_transfer_initiated",
        "MAX_DELIVERIES": "2"}}]
    components.insert(components.index(projector) + 1, late)
    path.write_text(yaml.safe_dump(doc))
    return path


def _cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def _state_entry(nc) -> tuple[bytes, int]:
    entry = await (await nc.jetstream().key_value("CC_STATE")).get(f"agg.bankaccount.{ACCOUNT}")
    return entry.value, entry.revision


async def _last_seq(nc, stream: str) -> int:
    return (await nc.jetstream().stream_info(stream)).state.last_seq


async def test_retried_dead_event_reaches_only_its_handler(example_components, tmp_path):
    with nats_server(tmp_path) as server, daemon(_manifest(tmp_path), tmp_path / "d.log", "--nats-url", server.url):
        async with client(server.url) as nc:
            js = nc.jetstream()
            outcomes = [await result(nc, await send(nc, "bankaccount", body)) for body in (
                {"command_type": "create_account", "key": ACCOUNT, "data": {
                    "accountNumber": ACCOUNT, "initialBalance": 5000, "minBalance": 100, "customerId": "C"}},
                {"command_type": "deposit_funds", "key": ACCOUNT, "data": {
                    "accountNumber": ACCOUNT, "amount": 300, "customerId": "C"}},
                {"command_type": "wire_funds", "key": ACCOUNT, "data": {
                    "accountNumber": ACCOUNT, "amount": 1200, "customerId": "C", "wireTransactionId": TRANSFER,
                    "targetRoutingNumber": "123456789", "targetAccountNumber": "OTHER-1"}})]
            assert [o["status"] for o in outcomes] == ["accepted"] * 3, outcomes

            async def letters():
                return await events_of_stream(nc, "CC_DEADLETTER", f"cc.deadletter.{LATE_CONSUMER}")

            dead = await eventually(letters, lambda found: len(found) == 2)
            assert [d["subject"] for d in dead] == [f"cc.events.funds_deposited.bankaccount.{ACCOUNT}",
                                                   f"cc.events.wire_transfer_initiated.bankaccount.{ACCOUNT}"]
            assert all(f"for unknown account {ACCOUNT}" in d["reason"] for d in dead), dead
            # every other handler has done its part: the transfer went through and the process ended
            done = await eventually(lambda: kv_json(nc, "CC_STATE", f"agg.bankaccount.{ACCOUNT}"),
                                    lambda s: s and s["balance"] == 4100 and s["reservedFunds"] == {})
            assert done["balance"] == 4100
            await quiescent(nc)
            assert await kv_json(nc, "CC_STATE", f"pm.interbankxfer.{TRANSFER}") is None
            transfer_events = sorted(e["type"] for s, e in await events(nc) if e["data"].get("wireTransferId") == TRANSFER)
            assert transfer_events == ["funds_committed", "funds_reserved", "wire_transfer_initiated",
                                       "wire_transfer_succeeded"]
            projected = await kv_json(nc, "CC_RM_bankaccount_projector", f"balance.{ACCOUNT}")
            assert projected["balance"] == 4100
            entries = await ledger(nc, ACCOUNT)
            assert [e["event"] for e in entries] == ["account_created", "funds_deposited", "funds_reserved",
                                                     "funds_committed"]
            state_before = await _state_entry(nc)
            commands_before = await _last_seq(nc, "CC_COMMANDS")

            # the late projector is given the account, then its two dead events are sent again
            await (await js.key_value(LATE_BUCKET)).put(f"balance.{ACCOUNT}", json.dumps({
                "accountNumber": ACCOUNT, "customerId": "C", "balance": 0, "reserved": 0, "entries": 0}).encode())
            listed = _cli("deadletters", "list", "--consumer", LATE_CONSUMER, "--nats-url", server.url)
            retried: dict[str, int] = {}
            for line in listed.splitlines():
                answer = _cli("deadletters", "retry", line.split("\t", 1)[0], "--nats-url", server.url)
                subject, seq = re.fullmatch(r"dead letter \d+ sent again on (\S+) as (\d+)", answer.strip()).groups()
                retried[subject.split(".")[2]] = int(seq)
                assert subject == f"cc.events.{subject.split('.')[2]}.bankaccount.{ACCOUNT}.retry"
            assert sorted(retried) == ["funds_deposited", "wire_transfer_initiated"]
            last_retry, first_retry = max(retried.values()), min(retried.values())
            checkpoint = lambda: kv_json(nc, LATE_BUCKET, f"_cc.checkpoint.{LATE_CONSUMER}")  # noqa: E731
            assert await eventually(checkpoint, last_retry) == last_retry
            await quiescent(nc)
            for consumer, copy in (("PROJ_bankaccount_projector", "funds_deposited"),
                                   ("PM_interbankxfer", "wire_transfer_initiated"),
                                   ("NOTIFIER_otherbank_gateway", "wire_transfer_initiated")):
                info = await js.consumer_info("CC_EVENTS", consumer)
                assert info.ack_floor.stream_seq >= retried[copy], (consumer, info)  # it was handed the copy

            # (a) the named handler acted on its retries, and it alone
            late = await kv_json(nc, LATE_BUCKET, f"balance.{ACCOUNT}")
            projected = await kv_json(nc, "CC_RM_bankaccount_projector", f"balance.{ACCOUNT}")
            assert {
                "dead letters left": await letters(),
                "late projector (balance, entries)": (late["balance"], late["entries"]),
                "bank projector balance": projected["balance"],
                "bank projector ledger": await ledger(nc, ACCOUNT),
                "commands sent since": await _last_seq(nc, "CC_COMMANDS") - commands_before,
                "events appended after the retries": await _last_seq(nc, "CC_EVENTS") - last_retry,
            } == {
                "dead letters left": [],
                "late projector (balance, entries)": (300, 1),  # the deposit, applied to what it was given
                "bank projector balance": 4100,
                "bank projector ledger": entries,  # the deposit not applied again
                "commands sent since": 0,  # the process manager started nothing again
                "events appended after the retries": 0,  # the other bank did not answer again
            }

            # (b) the aggregate folded nothing: its state, its log and its event consumer are as before
            instance = await events_of_stream(nc, "CC_EVENTS", f"cc.events.*.bankaccount.{ACCOUNT}")
            folded = await js.consumer_info("CC_EVENTS", "AGG_EVT_bankaccount")
            assert {
                "state (value, revision)": await _state_entry(nc),
                "instance events": [e["type"] for e in instance],
                "fold consumer handed a retry": folded.delivered.stream_seq >= first_retry,
            } == {
                "state (value, revision)": state_before,
                "instance events": ["account_created", "funds_deposited", "wire_transfer_initiated",
                                    "funds_reserved", "funds_committed"],
                "fold consumer handed a retry": False,
            }
