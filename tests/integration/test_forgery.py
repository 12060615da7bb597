"""With a signing key, a client who may publish on cc.events.> and write CC_STATE forges nothing:
the bank example on a real nats-server, a forged event and a forged state, a daemon started afresh."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from concordance_provider.signing import SIGNATURE
from concordance_provider.store.streams import events_config

from .harness import (
    ProviderProcess,
    client,
    daemon,
    events,
    events_of_stream,
    eventually,
    host_data_line,
    kv_json,
    nats_server,
    result,
    send,
)
from .test_event_retry import LATE_BUCKET, LATE_CONSUMER
from .test_event_retry import _manifest as late_projector_manifest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "examples" / "bankaccount" / "app.yaml"
COMMANDS = ROOT / "examples" / "bankaccount" / "commands"
ACCOUNT = "ABC123"
STATE_KEY = f"agg.bankaccount.{ACCOUNT}"


def _command(name: str) -> dict:
    return json.loads((COMMANDS / f"{name}.json").read_text())


def _signing_key(folder: Path) -> Path:
    path = folder / "signing.key"
    path.write_text(secrets.token_hex(32) + "\n")
    os.chmod(path, 0o600)
    return path


async def _projected(nc) -> int | None:
    found = await kv_json(nc, "CC_RM_bankaccount_projector", f"balance.{ACCOUNT}")
    return found and found["balance"]


async def _forgery_letters(nc, seq: int) -> dict[str, str]:
    """Consumer -> reason, of the dead letters of CC_EVENTS message ``seq``."""
    found = await events_of_stream(nc, "CC_DEADLETTER", "cc.deadletter.>")
    return {d["consumer"]: d["reason"] for d in found if (d["stream"], d["stream_seq"]) == ("CC_EVENTS", seq)}


async def test_a_forged_event_and_a_forged_state_change_nothing(example_components, tmp_path):
    key = _signing_key(tmp_path)
    with nats_server(tmp_path) as server:
        args = ("--nats-url", server.url, "--signing-key-file", str(key))
        async with client(server.url) as nc:
            js = nc.jetstream()
            with daemon(MANIFEST, tmp_path / "first.log", *args):
                for name in ("create_account_cmd", "deposit_cmd_1", "deposit_cmd_2", "withdraw_cmd_1",
                             "wire_cmd_commits"):
                    assert (await result(nc, await send(nc, "bankaccount", _command(name))))["status"] == "accepted"
                # the wire transfer goes through the process manager and the gateway, signed all the way
                assert await eventually(lambda: _projected(nc), 4500) == 4500
                assert (await kv_json(nc, "CC_STATE", STATE_KEY))["balance"] == 4500

                # a client copies a stored deposit, its signature header included, and makes it a million
                subject = f"cc.events.funds_deposited.bankaccount.{ACCOUNT}"
                genuine = await js.get_last_msg("CC_EVENTS", subject)
                assert SIGNATURE in genuine.headers
                body = json.loads(genuine.data)
                body.update(id=str(uuid.uuid4()), source="mallory", data={**body["data"], "amount": 1_000_000})
                copied = {k: v for k, v in genuine.headers.items() if not k.startswith("Nats-")}  # not its guard
                forged = await js.publish(subject, json.dumps(body).encode(),
                                          headers={**copied, "Nats-Msg-Id": uuid.uuid4().hex})
                # and an unsigned answer of the other bank for a transfer nobody made
                answer = await js.publish("cc.events.wire_transfer_succeeded.interbank.WT-666", json.dumps({
                    "specversion": "1.0", "id": str(uuid.uuid4()), "type": "wire_transfer_succeeded",
                    "source": "mallory", "time": body["time"], "x-concordance-stream": "interbank",
                    "data": {"wireTransferId": "WT-666", "accountNumber": ACCOUNT, "amount": 1}}).encode())

                letters = await eventually(lambda: _forgery_letters(nc, forged.seq), lambda f: len(f) == 2)
                assert sorted(letters) == ["AGG_EVT_bankaccount", "PROJ_bankaccount_projector"]
                assert all(r == "forged event: event signature does not verify" for r in letters.values()), letters
                pm_letters = await eventually(lambda: _forgery_letters(nc, answer.seq), lambda f: len(f) == 1)
                assert pm_letters == {"PM_interbankxfer": "forged event: event is not signed"}

                # then a state of five million, claiming to have folded the instance's last message
                state = await kv_json(nc, "CC_STATE", STATE_KEY)
                await js.publish(f"$KV.CC_STATE.{STATE_KEY}", json.dumps({**state, "balance": 5_000_000}).encode(),
                                 headers={"Concordance-Event-Sequence": str(forged.seq)})

            # a daemon started afresh has no state in memory: it reads the forged record
            with daemon(MANIFEST, tmp_path / "second.log", *args) as second:
                withdrawal = {"command_type": "withdraw_funds", "key": ACCOUNT,
                              "data": {"accountNumber": ACCOUNT, "amount": 900_000, "customerId": "CUSTBOB"}}
                outcome = await result(nc, await send(nc, "bankaccount", withdrawal))
                assert outcome["status"] == "rejected" and "insufficient funds" in outcome["error"], outcome
                deposit = {"command_type": "deposit_funds", "key": ACCOUNT,
                           "data": {"accountNumber": ACCOUNT, "amount": 100, "customerId": "CUSTBOB"}}
                assert (await result(nc, await send(nc, "bankaccount", deposit)))["status"] == "accepted"
                assert (await kv_json(nc, "CC_STATE", STATE_KEY))["balance"] == 4600
                assert await eventually(lambda: _projected(nc), 4600) == 4600
                logged = {entry["event"] for entry in second.logs()}
                assert "forged state record; ignored, the state is folded from the log" in logged
                assert "forged event; left out" in logged
            stored = [body for _, body in await events(nc, f"cc.events.*.bankaccount.{ACCOUNT}")]
            assert [e["source"] for e in stored].count("mallory") == 1  # stored, never folded


def test_an_unusable_signing_key_stops_the_start_with_the_reason(tmp_path):
    key = tmp_path / "signing.key"
    key.write_text(secrets.token_hex(32))
    os.chmod(key, 0o644)
    done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "up", str(MANIFEST),
                           "--nats-url", "nats://127.0.0.1:1", "--signing-key-file", str(key)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: signing key file {key} may be read by others (mode 0644); "
                                   f"make it private: chmod 600 {key}")


def test_a_provider_takes_its_signing_key_file_from_its_config(tmp_path):
    short = tmp_path / "short.key"
    short.write_text("too short\n")
    os.chmod(short, 0o600)
    with nats_server(tmp_path) as server:
        refused = ProviderProcess(host_data_line(server.url, "default", "concordance", [],
                                                 config={"SIGNING_KEY_FILE": str(short)}), tmp_path / "refused.log")
        assert refused.wait() == 2
        assert f"signing key file {short} holds 9 bytes; a key needs at least 32" in refused.log_path.read_text()
        provider = ProviderProcess(host_data_line(server.url, "default", "concordance", [],
                                                  config={"SIGNING_KEY_FILE": str(_signing_key(tmp_path))}),
                                   tmp_path / "provider.log")
        try:
            provider.wait_ready()
            [ready] = [entry for entry in provider.logs() if entry.get("event") == "concordance ready"]
            assert ready["signed"] is True
        finally:
            provider.stop()


async def test_a_signing_daemon_refuses_an_event_log_that_keeps_duplicates_out_too_briefly(example_components, tmp_path):
    with nats_server(tmp_path) as server:
        async with client(server.url) as nc:
            await nc.jetstream().add_stream(replace(events_config(), duplicate_window=120.0))
        done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "up", str(MANIFEST), "--nats-url",
                               server.url, "--signing-key-file", str(_signing_key(tmp_path))],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("error: stream CC_EVENTS drops duplicates for 120 s; with a signing key it must "
                                   "for at least 3600 s, or a copy of an event could be taken for new: nats stream "
                                   "edit CC_EVENTS --dupe-window 24h")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "concordance_provider.cli", *args], capture_output=True,
                          text=True, timeout=60)


async def test_a_dead_event_is_sent_again_only_if_genuine_and_then_signed_anew(example_components, tmp_path):
    """A second projector that knows no account dead-letters the account's deposit and transfer."""
    key = _signing_key(tmp_path)
    account = "SIGNED1"
    with nats_server(tmp_path) as server, daemon(late_projector_manifest(tmp_path), tmp_path / "d.log",
                                                  "--nats-url", server.url, "--signing-key-file", str(key)):
        async with client(server.url) as nc:
            for body in ({"command_type": "create_account", "key": account, "data": {
                              "accountNumber": account, "initialBalance": 5000, "customerId": "C"}},
                         {"command_type": "deposit_funds", "key": account, "data": {
                              "accountNumber": account, "amount": 300, "customerId": "C"}},
                         {"command_type": "wire_funds", "key": account, "data": {
                              "accountNumber": account, "amount": 1200, "customerId": "C", "wireTransactionId": "WT-S1",
                              "targetRoutingNumber": "123456789", "targetAccountNumber": "OTHER-1"}}):
                assert (await result(nc, await send(nc, "bankaccount", body)))["status"] == "accepted"

            async def dead() -> dict[str, str]:  # event type -> dead letter sequence, of the late projector
                listed = _cli("deadletters", "list", "--consumer", LATE_CONSUMER, "--nats-url", server.url)
                return {line.split("\t")[2].split(".")[2]: line.split("\t")[0] for line in listed.stdout.splitlines()}

            letters = await eventually(dead, lambda found: len(found) == 2)
            await (await nc.jetstream().key_value(LATE_BUCKET)).put(f"balance.{account}", json.dumps({
                "accountNumber": account, "customerId": "C", "balance": 0, "reserved": 0, "entries": 0}).encode())

            signed = _cli("deadletters", "retry", letters["funds_deposited"], "--nats-url", server.url,
                          "--signing-key-file", str(key))
            assert signed.returncode == 0, signed.stderr
            late = lambda: kv_json(nc, LATE_BUCKET, f"balance.{account}")  # noqa: E731
            assert (await eventually(late, lambda b: b["balance"] == 300))["balance"] == 300

            unsigned = _cli("deadletters", "retry", letters["wire_transfer_initiated"], "--nats-url", server.url)
            assert unsigned.returncode == 0, unsigned.stderr
            copy_seq = int(unsigned.stdout.split()[-1])
            found = await eventually(lambda: _forgery_letters(nc, copy_seq), lambda f: LATE_CONSUMER in f)
            assert found[LATE_CONSUMER] == "forged event: event signature does not verify"

            refused = _cli("deadletters", "retry", (await dead())["wire_transfer_initiated"], "--nats-url", server.url,
                           "--signing-key-file", str(key))
            assert refused.returncode == 2
            assert "is not an event the daemons wrote (event signature does not verify); not sent again" in refused.stderr
            assert (await late())["balance"] == 300
