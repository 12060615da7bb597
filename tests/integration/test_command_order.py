"""Commands of one key are decided in stream order whichever daemon holds them: a daemon that
dies holding the creates of fresh accounts does not let their deposits be decided first.

A daemon fetches a malformed command and, behind it in the same batch, the ``create_account``
commands of fresh accounts. It crashes on the malformed one (a failpoint: before its dead letter
is stored), so it dies holding every create, none of them started. New daemons (one, two,
three) then get three deposits per account, each sent after the previous command's ack. Every
deposit must wait for its account's create, and the held creates must be finished soon after.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from concordance_provider.failpoints import CRASH_EXIT_CODE, ENV
from concordance_provider.store.jetstream import read_all
from concordance_provider.store.results import read_result
from concordance_provider.store.streams import ensure_all

from .harness import READY_TIMEOUT, DaemonProcess, client, example_manifest, kv_json, nats_server, result, send

pytestmark = pytest.mark.integration

ACCOUNTS = [f"ORD{i:02d}" for i in range(20)]
OPENING = 1000
DEPOSITS = (10, 20, 30)
RECOVERY_SECONDS = 10.0  # from the crash until the commands the dead daemon held are finished
CAUSATION = "Concordance-Causation"  # on each event: "command:{seq}" of the command that caused it


def create(account: str) -> dict:
    return {"command_type": "create_account", "key": account,
            "data": {"accountNumber": account, "initialBalance": OPENING, "customerId": "C"}}


def deposit(account: str, amount: int) -> dict:
    return {"command_type": "deposit_funds", "key": account,
            "data": {"accountNumber": account, "amount": amount, "customerId": "C"}}


async def stored_commands(nc: NATS) -> set[int]:
    return {m.seq for m in await read_all(nc, "CC_COMMANDS", "cc.commands.bankaccount")}


async def seconds_until_finished(nc: NATS, seqs: dict[str, int], since: float) -> float:
    """How long after ``since`` every one of ``seqs`` was finished (or the time it gave up)."""
    deadline = since + RECOVERY_SECONDS + 30
    while not await finished(nc, seqs) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return time.monotonic() - since


async def finished(nc: NATS, seqs: dict[str, int]) -> bool:
    """Every one of ``seqs`` has left the queue and has an outcome."""
    if await stored_commands(nc) & set(seqs.values()):
        return False
    for seq in seqs.values():
        if await read_result(nc, seq) is None:
            return False
    return True


async def deposits_after_each_ack(nc: NATS, account: str, mixed: bool) -> list[int]:
    """``mixed``: every other deposit on the key's own subject, ``cc.commands.bankaccount.{account}``."""
    return [await send(nc, "bankaccount", deposit(account, amount), key=account if mixed and i % 2 == 0 else None)
            for i, amount in enumerate(DEPOSITS)]


def wait_for_crash(process: DaemonProcess) -> float:
    deadline = time.monotonic() + READY_TIMEOUT  # it crashes on its first batch, once it has started
    while process.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    crashed_at = time.monotonic()
    assert process.stop() == CRASH_EXIT_CODE, process.log_path.read_text()
    return crashed_at


@pytest.mark.parametrize("daemons, mixed", [(1, False), (2, False), (3, False), (2, True)],
                         ids=["1", "2", "3", "2-both-subjects"])
async def test_commands_held_by_a_crashed_daemon_come_before_later_commands_of_their_key(
        example_components, tmp_path: Path, daemons: int, mixed: bool) -> None:
    manifest = example_manifest(tmp_path, {})
    with nats_server(tmp_path) as server:
        args = ("--nats-url", server.url, "--log-level", "debug")
        async with client(server.url) as nc:
            await ensure_all(nc.jetstream())
            # sent before the daemon starts, so its first batch holds them all; the malformed
            # command comes first, and the daemon crashes on it before it starts on any create
            malformed = await send(nc, "bankaccount", b"{not json")
            creates = {account: await send(nc, "bankaccount", create(account)) for account in ACCOUNTS}
            holder = DaemonProcess(manifest, tmp_path / "holder.log", *args,
                                   env={ENV: "deadletter.before_store=crash@1"})
            crashed_at = wait_for_crash(holder)
            held = await nc.jetstream().consumer_info("CC_COMMANDS", "AGG_CMD_bankaccount")
            assert held.num_ack_pending == len(ACCOUNTS) + 1 and held.num_pending == 0
            assert await stored_commands(nc) == {malformed, *creates.values()}
            assert not await read_all(nc, "CC_EVENTS", "cc.events.>"), "the crashed daemon started a create"

            recovery = asyncio.create_task(seconds_until_finished(nc, creates, crashed_at))
            successors = [DaemonProcess(manifest, tmp_path / f"daemon{i}.log", *args) for i in range(daemons)]
            try:
                for process in successors:
                    process.wait_ready()
                sent = await asyncio.gather(*(deposits_after_each_ack(nc, a, mixed) for a in ACCOUNTS))
                deposits = dict(zip(ACCOUNTS, sent))

                outcomes = {seq: await result(nc, seq, timeout=60) for seqs in deposits.values() for seq in seqs}
                refused = {seq: o.get("error") for seq, o in outcomes.items() if o["status"] != "accepted"}
                assert not refused, (f"{len(refused)} of {len(outcomes)} deposits decided before their account's "
                                     f"create: {sorted(refused.items())[:3]} ...")

                took = await recovery
                print(f"{daemons} daemon(s): the held commands were finished {took:.1f} s after the crash")
                assert await finished(nc, creates)
                assert took < RECOVERY_SECONDS, f"held commands finished {took:.1f}s after the crash"
                for account in ACCOUNTS:
                    assert (await result(nc, creates[account]))["status"] == "accepted"
                assert (await result(nc, malformed))["status"] == "rejected"

                for account in ACCOUNTS:
                    state = await kv_json(nc, "CC_STATE", f"agg.bankaccount.{account}")
                    assert state["balance"] == OPENING + sum(DEPOSITS), account
                    log = await read_all(nc, "CC_EVENTS", f"cc.events.*.bankaccount.{account}")
                    causes = [int(m.headers[CAUSATION].split(":")[1]) for m in log]
                    assert causes == [creates[account], *deposits[account]], (account, causes)
            finally:
                recovery.cancel()  # still watching if the test failed early
                await asyncio.gather(recovery, return_exceptions=True)
                for process in successors:
                    process.stop()


BACKLOG_ACCOUNTS = [f"BKL{i:02d}" for i in range(20)]
BACKLOG_DEPOSITS = 100  # per account: 2,000 in all, fetched 200 at a time
BACKLOG_SECONDS = 60.0  # two or three daemons decide them in about 5 s on a 2-core machine
HANDED_BACK_AT_MOST = 1.1  # deliveries per command
CONFLICTS_AT_MOST = 0.01  # append conflicts per command (about 0.035 when stale state was tried first)


@pytest.mark.parametrize("count", [2, 3])
async def test_a_backlog_shared_by_daemons_is_decided_in_order_and_without_going_round(
        example_components, tmp_path: Path, count: int) -> None:
    """The daemons start on a queue of 2,000 deposits over 20 accounts, so nearly every batch one
    fetches holds commands of keys whose earlier commands another one holds. Those wait in place
    while the other decides them. Handed back instead, they made the commands behind them wait in
    turn, and the queue went round and round."""
    manifest = example_manifest(tmp_path, {})
    with nats_server(tmp_path) as server:
        args = ("--nats-url", server.url, "--log-level", "debug", "--roles", "aggregate")
        async with client(server.url) as nc:
            await ensure_all(nc.jetstream())
            creates = {account: await send(nc, "bankaccount", create(account)) for account in BACKLOG_ACCOUNTS}
            deposits: dict[str, list[int]] = {account: [] for account in BACKLOG_ACCOUNTS}
            for round_ in range(BACKLOG_DEPOSITS):
                sent = await asyncio.gather(*(send(nc, "bankaccount", deposit(account, round_ + 1))
                                              for account in BACKLOG_ACCOUNTS))
                for account, seq in zip(BACKLOG_ACCOUNTS, sent):
                    deposits[account].append(seq)
            started = time.monotonic()
            daemons = [DaemonProcess(manifest, tmp_path / f"daemon{i}.log", *args) for i in range(count)]
            try:
                every = [seq for seqs in deposits.values() for seq in seqs]
                outcomes = [await result(nc, seq, timeout=max(BACKLOG_SECONDS + started - time.monotonic(), 1))
                            for seq in every]
                took = time.monotonic() - started
                consumer = await nc.jetstream().consumer_info("CC_COMMANDS", "AGG_CMD_bankaccount")
                commands = len(creates) + len(every)
                print(f"{count} daemons decided a backlog of {commands} commands in {took:.1f} s, "
                      f"with {consumer.delivered.consumer_seq} deliveries")
                assert all(outcome["status"] == "accepted" for outcome in outcomes)
                assert took < BACKLOG_SECONDS
                # a command goes back only when what it waits for stops moving for a second
                assert consumer.delivered.consumer_seq <= commands * HANDED_BACK_AT_MOST, \
                    f"{consumer.delivered.consumer_seq} deliveries for {commands} commands"
                deciding = [p for p in daemons if any(e.get("event") == "command accepted" for e in p.logs())]
                assert len(deciding) >= 2, "one daemon decided everything: nothing was shared"
                # a command that waited for another daemon is decided on fresh state, not on the state
                # kept here from before, which would only meet an append conflict and be decided again
                conflicts = sum(e.get("event") == "append conflict; deciding again"
                                for process in daemons for e in process.logs())
                assert conflicts <= commands * CONFLICTS_AT_MOST, f"{conflicts} append conflicts"
                for account in BACKLOG_ACCOUNTS:
                    log = await read_all(nc, "CC_EVENTS", f"cc.events.*.bankaccount.{account}")
                    causes = [int(m.headers[CAUSATION].split(":")[1]) for m in log]
                    assert causes == [creates[account], *deposits[account]], account
            finally:
                for process in daemons:
                    process.stop()
