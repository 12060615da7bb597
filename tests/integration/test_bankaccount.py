"""The bank-account example end to end: real nats-server, the daemon, four real components."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import nats
import pytest

from concordance_provider.tracing import is_valid

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
    (b"{not json", "malformed command: body: Invalid JSON"),
    (b"[" * 100_000, "malformed command: "),  # deeper than any parser goes
    ({"key": "K1", "data": {}}, "malformed command: command_type: Field required"),
    ({"command_type": "deposit_funds", "data": {}}, "malformed command: key: Field required"),
    ({"command_type": "deposit_funds", "key": "K1"}, "malformed command: data: Field required"),
    ({"command_type": 7, "key": "K1", "data": {}}, "malformed command: command_type: Input should be a valid string"),
    ({"command_type": "deposit_funds", "key": ["K1"], "data": {}}, "malformed command: key: Input should be a valid string"),
    ({"command_type": "deposit_funds", "key": "K1", "data": [1]}, "malformed command: data: Input should be an object"),
    ({"command_type": "deposit_funds", "key": "a.>", "data": {}}, "malformed command: key: Value error, key 'a.>' is not allowed"),
    ({"command_type": "deposit_funds", "key": "*", "data": {}}, "malformed command: key: Value error, key '*' is not allowed"),
    ({"command_type": "deposit_funds", "key": "has space", "data": {}}, "key 'has space' is not allowed"),
    ({"command_type": "deposit_funds", "key": "", "data": {}}, "malformed command: key: Value error, key '' is not allowed"),
    ({"command_type": "deposit_funds", "key": "K1\n", "data": {}}, "key 'K1\\n' is not allowed"),
    ({"command_type": "deposit_funds", "key": "K" * 129, "data": {}}, f"key '{'K' * 129}' is not allowed"),
])
async def test_malformed_commands_are_rejected_and_the_daemon_goes_on(bank, body, error):
    url, process = bank
    async with client(url) as nc:
        seq = await send(nc, "bankaccount", body)
        outcome = await result(nc, seq)
        assert outcome["status"] == "rejected" and outcome["error"].startswith("malformed command: ")
        assert error in outcome["error"]
        letters = await events_of_stream(nc, "CC_DEADLETTER", "cc.deadletter.AGG_CMD_bankaccount")
        assert [d["reason"] for d in letters if d["stream_seq"] == seq] == [outcome["error"]]
        assert (await result(nc, await send(nc, "bankaccount", _account(f"OK-{uuid.uuid4().hex[:8]}", 1))))["status"] == "accepted"
    assert process.process.poll() is None


async def test_unknown_command_type_is_rejected_with_the_aggregates_own_text(bank):
    url, _ = bank
    async with client(url) as nc:
        assert (await result(nc, await send(nc, "bankaccount", _account("UNK1", 40))))["status"] == "accepted"
        before = await events(nc, "cc.events.*.bankaccount.UNK1")
        outcome = await result(nc, await send(nc, "bankaccount", {
            "command_type": "LaunchRocket", "key": "UNK1", "data": {"accountNumber": "UNK1", "customerId": "C1"}}))
        assert is_valid(outcome.pop("traceparent"))
        assert outcome == {"status": "rejected", "aggregate": "bankaccount", "command_type": "launch_rocket",
                           "key": "UNK1", "events": [], "error": "unknown command type 'launch_rocket'"}
        assert await events(nc, "cc.events.*.bankaccount.UNK1") == before
        assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.UNK1"))["balance"] == 40


async def test_command_over_the_maximum_payload_is_refused_by_nats_and_never_stored(bank):
    url, _ = bank
    async with client(url) as nc:
        js = nc.jetstream()
        stored_before = (await js.stream_info("CC_COMMANDS")).state.last_seq
        huge = {"command_type": "deposit_funds", "key": "BIG1", "data": {"note": "x" * nc.max_payload}}
        with pytest.raises(nats.errors.MaxPayloadError):
            await send(nc, "bankaccount", huge)
        assert (await js.stream_info("CC_COMMANDS")).state.last_seq == stored_before
        # the client is still connected and the daemon still serving
        assert (await result(nc, await send(nc, "bankaccount", _account("AFTER-BIG", 1))))["status"] == "accepted"


async def test_undecodable_command_is_kept_as_a_dead_letter(bank):
    url, _ = bank
    async with client(url) as nc:
        seq = await send(nc, "bankaccount", b"\xff\xfe not even text")
        outcome = await result(nc, seq)
        assert outcome["status"] == "rejected" and outcome["error"].startswith("malformed command: ")
        letters = await events_of_stream(nc, "CC_DEADLETTER", "cc.deadletter.AGG_CMD_bankaccount")
        (letter,) = [d for d in letters if d["stream_seq"] == seq]
        assert letter["subject"] == "cc.commands.bankaccount" and letter["reason"] == outcome["error"]
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
            return {d["stream_seq"]: (d["reason"], d["deliveries"]) for d in found}

        found = await eventually(letters, lambda f: {garbage.seq, keyless.seq} <= set(f))
        assert "not a Concordance event" in found[garbage.seq][0]
        reason, deliveries = found[keyless.seq]
        assert "no usable process key in field 'wireTransferId'" in reason
        assert deliveries == 1  # at once: no delivery could ever find the key
        assert (await result(nc, await send(nc, "bankaccount", _account("AFTER-G", 1))))["status"] == "accepted"
    assert process.process.poll() is None


async def test_garbage_on_an_instance_subject_does_not_break_the_instance(bank):
    url, _ = bank
    async with client(url) as nc:
        await result(nc, await send(nc, "bankaccount", _account("JUNK1", 10)))
        junk = await nc.jetstream().publish("cc.events.funds_deposited.bankaccount.JUNK1", b"junk")
        deposit = {"command_type": "deposit_funds", "key": "JUNK1",
                   "data": {"accountNumber": "JUNK1", "amount": 5, "customerId": "C1"}}
        assert (await result(nc, await send(nc, "bankaccount", deposit)))["status"] == "accepted"
        assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.JUNK1"))["balance"] == 15

        async def letters() -> dict[str, str]:  # consumer -> reason, for the junk message
            found = await events_of_stream(nc, "CC_DEADLETTER", "cc.deadletter.>")
            return {d["consumer"]: d["reason"] for d in found if (d["stream"], d["stream_seq"]) == ("CC_EVENTS", junk.seq)}

        # one dead letter for each consumer it reached: the aggregate's state consumer and the projector
        found = await eventually(letters, lambda f: len(f) == 2)
        assert sorted(found) == ["AGG_EVT_bankaccount", "PROJ_bankaccount_projector"]
        assert all(reason.startswith("not a Concordance event") for reason in found.values()), found
        assert await eventually(lambda: _projected_balance(nc, "JUNK1"), 15) == 15


async def test_command_for_unknown_aggregate_is_answered_and_removed_from_the_queue(bank):
    url, _ = bank
    async with client(url) as nc:
        js = nc.jetstream()
        seq = await send(nc, "spaceship", {"command_type": "launch", "key": "S1", "data": {}})
        outcome = await result(nc, seq, aggregate="spaceship", key="S1")  # under its aggregate and key
        assert is_valid(outcome.pop("traceparent"))
        assert outcome == {"status": "rejected", "aggregate": "spaceship", "key": "S1", "events": [],
                           "error": "no aggregate named 'spaceship' is linked; command discarded"}

        async def still_stored() -> bool:
            try:
                await js.get_msg("CC_COMMANDS", seq)
                return True
            except nats.js.errors.NotFoundError:
                return False

        assert await eventually(still_stored, False) is False
        info = await js.stream_info("CC_COMMANDS", subjects_filter="cc.commands.spaceship")
        assert not info.state.subjects  # nothing left for the aggregate nobody linked


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
