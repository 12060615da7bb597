"""The bank-account example end to end: real nats-server, the daemon, four real components."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest

from .harness import (
    client,
    daemon,
    events,
    events_of_stream,
    eventually,
    kv_json,
    ledger,
    nats_server,
    result,
    send,
)

pytestmark = pytest.mark.integration

COMMANDS = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "commands"
MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "app.yaml"


@pytest.fixture(scope="module")
def bank(example_components, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bank")
    with nats_server(tmp) as server:
        with daemon(MANIFEST, tmp / "daemon.log", "--nats-url", server.url) as process:
            yield server.url, process


def _original(name: str) -> dict:
    return json.loads((COMMANDS / f"{name}.json").read_text())


def _account(number: str, balance: int, minimum: int = 0) -> dict:
    return {"command_type": "create_account", "key": number, "data": {
        "accountNumber": number, "initialBalance": balance, "minBalance": minimum, "customerId": "C1"}}


async def test_original_scenario_ends_at_6000(bank):
    url, _ = bank
    async with client(url) as nc:
        seqs = [await send(nc, "bankaccount", _original(name)) for name in
                ("create_account_cmd", "deposit_cmd_1", "deposit_cmd_2", "withdraw_cmd_1")]
        outcomes = [await result(nc, seq) for seq in seqs]
        assert [o["status"] for o in outcomes] == ["accepted"] * 4
        state = await kv_json(nc, "CC_STATE", "agg.bankaccount.ABC123")
        assert state["balance"] == 6000
        projected = await eventually(
            lambda: _projected_balance(nc, "ABC123"), 6000)
        assert projected == 6000
        entries = await ledger(nc, "ABC123")
        assert [entry["event"] for entry in entries] == [
            "account_created", "funds_deposited", "funds_deposited", "funds_withdrawn"]


async def _projected_balance(nc, account: str):
    balance = await kv_json(nc, "CC_RM_bankaccount_projector", f"balance.{account}")
    return balance and balance["balance"]


async def test_events_are_cloudevents_on_one_wildcard_per_type(bank):
    url, _ = bank
    async with client(url) as nc:
        await result(nc, await send(nc, "bankaccount", _account("CE1", 50)))
        stored = await events(nc, "cc.events.account_created.>")
        subject, event = next((s, e) for s, e in stored if e["data"]["accountNumber"] == "CE1")
        assert subject == "cc.events.account_created.bankaccount.CE1"
        assert event["specversion"] == "1.0" and event["type"] == "account_created"
        assert event["source"] == "concordance" and event["datacontenttype"] == "application/json"
        assert event["x-concordance-stream"] == "bankaccount"


async def test_rejected_command_tells_the_client_why(bank):
    url, _ = bank
    async with client(url) as nc:
        await result(nc, await send(nc, "bankaccount", _account("POOR1", 100, minimum=50)))
        outcome = await result(nc, await send(nc, "bankaccount", {
            "command_type": "withdraw_funds", "key": "POOR1",
            "data": {"accountNumber": "POOR1", "amount": 60, "customerId": "C1"}}))
        assert outcome["status"] == "rejected"
        assert "insufficient funds" in outcome["error"]
        assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.POOR1"))["balance"] == 100


@pytest.mark.parametrize("body, error", [
    (b"{not json", "Invalid JSON"),
    (b"[" * 100_000, "malformed command"),  # deeper than any parser goes
    ({"key": "K1", "data": {}}, "command_type"),
    ({"command_type": "deposit_funds", "data": {}}, "key"),
    ({"command_type": "deposit_funds", "key": "a.>", "data": {}}, "'a.>' is not allowed"),
    ({"command_type": "deposit_funds", "key": "*", "data": {}}, "is not allowed"),
    ({"command_type": "deposit_funds", "key": "has space", "data": {}}, "is not allowed"),
    ({"command_type": "deposit_funds", "key": "", "data": {}}, "is not allowed"),
    ({"command_type": "launch_rocket", "key": "NOBODY", "data": {}}, "account does not exist"),
])
async def test_malformed_commands_are_rejected_and_the_daemon_goes_on(bank, body, error):
    url, process = bank
    async with client(url) as nc:
        outcome = await result(nc, await send(nc, "bankaccount", body))
        assert outcome["status"] == "rejected" and error in outcome["error"]
        assert (await result(nc, await send(nc, "bankaccount", _account(f"OK-{uuid.uuid4().hex[:8]}", 1))))["status"] == "accepted"
    assert process.process.poll() is None


async def test_undecodable_command_is_kept_as_a_dead_letter(bank):
    url, _ = bank
    async with client(url) as nc:
        seq = await send(nc, "bankaccount", b"\xff\xfe not even text")
        assert (await result(nc, seq))["status"] == "rejected"
        letters = await events_of_stream(nc, "CC_DEADLETTER", "cc.deadletter.AGG_CMD_bankaccount")
        (letter,) = [d for d in letters if d["stream_seq"] == seq]
        assert letter["subject"] == "cc.commands.bankaccount" and "malformed command" in letter["reason"]
        assert base64.b64decode(letter["body_b64"]) == b"\xff\xfe not even text"


async def test_foreign_or_keyless_events_become_dead_letters(bank):
    """Anyone with access may publish on cc.events: the process manager must not choke on it."""
    url, process = bank
    async with client(url) as nc:
        js = nc.jetstream()
        garbage = await js.publish("cc.events.wire_transfer_succeeded.interbank.G1", b"\x00 not an event")
        keyless = await js.publish("cc.events.wire_transfer_succeeded.interbank.G2", json.dumps({
            "specversion": "1.0", "id": "x", "type": "wire_transfer_succeeded", "source": "elsewhere",
            "time": "2026-01-01T00:00:00Z", "data": {"note": "no transfer id"},
            "x-concordance-stream": "interbank"}).encode())

        async def letters():
            found = await events_of_stream(nc, "CC_DEADLETTER", "cc.deadletter.PM_interbankxfer")
            return {d["stream_seq"]: d["reason"] for d in found}

        found = await eventually(letters, lambda f: {garbage.seq, keyless.seq} <= set(f))
        assert "not a Concordance event" in found[garbage.seq]
        assert "no usable process key in field 'wireTransferId'" in found[keyless.seq]
        assert (await result(nc, await send(nc, "bankaccount", _account("AFTER-G", 1))))["status"] == "accepted"
    assert process.process.poll() is None


async def test_garbage_on_an_instance_subject_does_not_break_the_instance(bank):
    url, _ = bank
    async with client(url) as nc:
        await result(nc, await send(nc, "bankaccount", _account("JUNK1", 10)))
        await nc.jetstream().publish("cc.events.funds_deposited.bankaccount.JUNK1", b"junk")
        deposit = {"command_type": "deposit_funds", "key": "JUNK1",
                   "data": {"accountNumber": "JUNK1", "amount": 5, "customerId": "C1"}}
        assert (await result(nc, await send(nc, "bankaccount", deposit)))["status"] == "accepted"
        assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.JUNK1"))["balance"] == 15


async def test_command_for_unknown_aggregate_is_answered(bank):
    url, _ = bank
    async with client(url) as nc:
        outcome = await result(nc, await send(nc, "spaceship", {"command_type": "launch", "key": "S1"}))
        assert outcome["status"] == "rejected" and "no aggregate named 'spaceship'" in outcome["error"]


async def _wire(nc, account: str, transfer: str, amount: int, routing: str) -> None:
    outcome = await result(nc, await send(nc, "bankaccount", {
        "command_type": "wire_funds", "key": account, "data": {
            "accountNumber": account, "amount": amount, "customerId": "C1", "wireTransactionId": transfer,
            "targetRoutingNumber": routing, "targetAccountNumber": "OTHER-1"}}))
    assert outcome["status"] == "accepted", outcome


async def _event_types_of(nc, transfer: str) -> list[str]:
    return [e["type"] for _, e in await events(nc) if e["data"].get("wireTransferId") == transfer]


async def test_wire_transfer_commits_funds_through_the_process_manager(bank):
    url, _ = bank
    async with client(url) as nc:
        await result(nc, await send(nc, "bankaccount", _account("WIRE1", 5000, minimum=100)))
        await _wire(nc, "WIRE1", "WT-OK", 1200, "123456789")
        final = ["wire_transfer_initiated", "funds_reserved", "wire_transfer_succeeded", "funds_committed"]
        seen = await eventually(lambda: _sorted_types(nc, "WT-OK"), sorted(final))
        assert seen == sorted(final)
        state = await eventually(lambda: kv_json(nc, "CC_STATE", "agg.bankaccount.WIRE1"),
                                 {"accountNumber": "WIRE1", "customerId": "C1", "balance": 3800,
                                  "minBalance": 100, "reservedFunds": {}})
        assert state["balance"] == 3800 and state["reservedFunds"] == {}
        assert await eventually(lambda: kv_json(nc, "CC_STATE", "pm.interbankxfer.WT-OK"), None) is None
        assert await eventually(lambda: _projected_balance(nc, "WIRE1"), 3800) == 3800


async def test_refused_wire_transfer_releases_the_funds(bank):
    url, _ = bank
    async with client(url) as nc:
        await result(nc, await send(nc, "bankaccount", _account("WIRE2", 5000)))
        await _wire(nc, "WIRE2", "WT-NO", 700, "12")  # the other bank knows no such routing number
        final = ["wire_transfer_initiated", "funds_reserved", "wire_transfer_failed", "funds_released"]
        assert await eventually(lambda: _sorted_types(nc, "WT-NO"), sorted(final)) == sorted(final)
        state = await kv_json(nc, "CC_STATE", "agg.bankaccount.WIRE2")
        assert state["balance"] == 5000 and state["reservedFunds"] == {}
        # released funds are available again
        outcome = await result(nc, await send(nc, "bankaccount", {
            "command_type": "withdraw_funds", "key": "WIRE2",
            "data": {"accountNumber": "WIRE2", "amount": 5000, "customerId": "C1"}}))
        assert outcome["status"] == "accepted"


async def _sorted_types(nc, transfer: str) -> list[str]:
    return sorted(await _event_types_of(nc, transfer))
