"""State is derived data: rebuild it from the log; replay events into a read model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .harness import (
    client,
    daemon,
    eventually,
    kv_json,
    ledger,
    nats_server,
    result,
    send,
)

pytestmark = pytest.mark.integration

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "app.yaml"
ACCOUNTS = ("RB1", "RB2", "RB3")


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "concordance_provider.cli", *args],
                          capture_output=True, text=True, timeout=120, input=stdin)


@pytest.fixture(scope="module")
def busy_bank(example_components, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("maintenance")
    with nats_server(tmp) as server, daemon(MANIFEST, tmp / "d.log", "--nats-url", server.url):
        yield server.url


async def _state_bytes(nc, key: str) -> bytes | None:
    kv = await nc.jetstream().key_value("CC_STATE")
    try:
        return (await kv.get(key)).value
    except Exception:
        return None


async def test_rebuild_gives_the_same_bytes_after_state_is_lost(busy_bank):
    async with client(busy_bank) as nc:
        for number, account in enumerate(ACCOUNTS):
            await result(nc, await send(nc, "bankaccount", {"command_type": "create_account", "key": account,
                         "data": {"accountNumber": account, "initialBalance": 100 * number, "customerId": "C"}}))
            for amount in (5, 7):
                await result(nc, await send(nc, "bankaccount", {"command_type": "deposit_funds", "key": account,
                             "data": {"accountNumber": account, "amount": amount, "customerId": "C"}}))
        before = {a: await _state_bytes(nc, f"agg.bankaccount.{a}") for a in ACCOUNTS}
        kv = await nc.jetstream().key_value("CC_STATE")
        await kv.purge("agg.bankaccount.RB1")
        assert await _state_bytes(nc, "agg.bankaccount.RB1") is None

        one = _cli("rebuild", str(MANIFEST), "bankaccount.RB1", "--nats-url", busy_bank)
        assert one.returncode == 0, one.stderr
        assert await _state_bytes(nc, "agg.bankaccount.RB1") == before["RB1"]

        await nc.jetstream().purge_stream("KV_CC_STATE")  # lose every state
        everything = _cli("rebuild", str(MANIFEST), "--nats-url", busy_bank)
        assert everything.returncode == 0, everything.stderr
        for account in ACCOUNTS:
            assert await _state_bytes(nc, f"agg.bankaccount.{account}") == before[account]
        # and the aggregate goes on from the rebuilt state
        deposit = {"command_type": "deposit_funds", "key": "RB2",
                   "data": {"accountNumber": "RB2", "amount": 1, "customerId": "C"}}
        assert (await result(nc, await send(nc, "bankaccount", deposit)))["status"] == "accepted"
        assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.RB2"))["balance"] == 113


def test_rebuild_names_what_it_cannot_find(busy_bank):
    done = _cli("rebuild", str(MANIFEST), "nosuch", "--nats-url", busy_bank)
    assert done.returncode == 2 and "no aggregate named 'nosuch'" in done.stderr


async def test_replay_restores_a_lost_read_model(busy_bank):
    async with client(busy_bank) as nc:
        await result(nc, await send(nc, "bankaccount", {"command_type": "create_account", "key": "RP1",
                     "data": {"accountNumber": "RP1", "initialBalance": 10, "customerId": "C"}}))
        await result(nc, await send(nc, "bankaccount", {"command_type": "deposit_funds", "key": "RP1",
                     "data": {"accountNumber": "RP1", "amount": 5, "customerId": "C"}}))
        bucket = "CC_RM_bankaccount_projector"
        balance = lambda: kv_json(nc, bucket, "balance.RP1")  # noqa: E731
        expected = {"accountNumber": "RP1", "customerId": "C", "balance": 15, "reserved": 0, "entries": 2}
        assert await eventually(balance, expected) == expected
        entries = await ledger(nc, "RP1")
        await nc.jetstream().purge_stream(f"KV_{bucket}")  # the read model is lost

        done = _cli("replay", str(MANIFEST), "bankaccount_projector", "--nats-url", busy_bank)
        assert done.returncode == 0, done.stderr
        assert "event(s) to replay" in done.stdout
        assert await eventually(balance, expected) == expected
        assert await ledger(nc, "RP1") == entries  # applied once, not twice


async def test_replay_from_a_sequence_refeeds_only_what_follows(busy_bank):
    """From a sequence the read model is kept: the handler sees those events once more."""
    async with client(busy_bank) as nc:
        deposit = await nc.jetstream().get_last_msg("CC_EVENTS", "cc.events.funds_deposited.bankaccount.RP1")
        done = _cli("replay", str(MANIFEST), "bankaccount_projector", "--from-seq", str(deposit.seq),
                    "--nats-url", busy_bank)
        assert done.returncode == 0, done.stderr
        assert "PROJ_bankaccount_projector: 1 event(s) to replay" in done.stdout
        balance = lambda: kv_json(nc, "CC_RM_bankaccount_projector", "balance.RP1")  # noqa: E731
        assert (await eventually(balance, lambda b: b["balance"] == 20))["entries"] == 3


def test_replaying_a_notifier_asks_first(busy_bank):
    done = _cli("replay", str(MANIFEST), "otherbank_gateway", "--nats-url", busy_bank, stdin="n\n")
    assert done.returncode != 0 and "repeats its side effects" in done.stdout
