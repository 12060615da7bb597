"""The fault suite's load: bank commands, wire transfers and multi-event `tally` commands, paced,
with malformed commands mixed in. Each logical command carries one message id (``Nats-Msg-Id``)
that a retried publish repeats, so JetStream stores it once even when an ack is lost."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import nats
from nats.aio.client import Client as NATS

BAD_INPUTS = [
    b"{not json", b"\xff\xfe", b"[" * 50_000, b'{"key": "A1"}', b'{"command_type": "deposit_funds"}',
    b'{"command_type": "deposit_funds", "key": "a.>"}', b'{"command_type": "deposit_funds", "key": "*"}',
    b'{"command_type": "deposit_funds", "key": " "}', b'{"command_type": "launch", "key": "NOBODY"}',
]
WELL_FORMED = 8  # the one bad input that parses: a command type the aggregate does not know
MSG_ID = "Nats-Msg-Id"
TAIL = 0.1  # of the planned commands, sent after the last fault
MAX_LOAD = 10  # the load never sends more than this many times its planned commands


@dataclass
class Plan:
    commands: int  # the load sends at least these, more while faults remain to be made
    kills: int
    nats_restarts: int
    failpoints: int
    accounts: int = 12
    senders: int = 4
    rate: float = 100.0  # commands per second the driver aims at
    seed: int = 7


@dataclass
class Sent:
    """What the driver had acknowledged: CC_COMMANDS sequence -> message id."""

    commands: dict[int, str] = field(default_factory=dict)
    bad: dict[int, str] = field(default_factory=dict)

    def all(self) -> dict[int, str]:
        return {**self.commands, **self.bad}


class Progress:
    """How far the load is, for faults to wait on; the load waits while a fault restarts the
    daemon. The load sends at least its planned commands, and goes on while faults remain to
    be made and for a tenth of the plan after the last, so that every fault falls where it was
    planned, while the load runs, and the daemon recovers under load."""

    def __init__(self, planned: int) -> None:
        self.planned = planned
        self.count = 0  # commands acknowledged
        self.last_seq = 0  # the highest CC_COMMANDS sequence acknowledged so far
        self.done = False
        self.paused = False
        self.end: float = float("inf")  # where the load ends, once every fault is made
        self._changed = asyncio.Condition()

    async def advance(self, seq: int) -> None:
        async with self._changed:
            self.count += 1
            self.last_seq = max(self.last_seq, seq)
            self._changed.notify_all()

    async def finish(self) -> None:
        async with self._changed:
            self.done = True
            self._changed.notify_all()

    async def reached(self, count: float) -> bool:
        """Wait until ``count`` commands are acknowledged (True) or the load ends first (False)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.count >= count or self.done)
            return not self.done

    @asynccontextmanager
    async def pause(self) -> AsyncIterator[None]:
        async with self._changed:
            self.paused = True
        try:
            yield
        finally:
            async with self._changed:
                self.paused = False
                self._changed.notify_all()

    async def all_faults_made(self) -> None:
        async with self._changed:
            self.end = max(self.planned, self.count + self.planned * TAIL)
            self._changed.notify_all()

    async def clear_to_send(self) -> None:
        """Wait while a fault is being made."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self.paused)


def bad_input_plan(reserved: int) -> tuple[list[int], list[int]]:
    """Which BAD_INPUTS the load spreads over itself, and which it keeps to throw right after a
    failpoint that only a malformed command reaches is armed (the last ``reserved`` of those)."""
    malformed = [i for i in range(len(BAD_INPUTS)) if i != WELL_FORMED]
    if reserved > len(malformed):
        raise ValueError(f"at most {len(malformed)} failpoints that only a malformed command reaches")
    kept = malformed[len(malformed) - reserved:] if reserved else []
    return [i for i in range(len(BAD_INPUTS)) if i not in kept], kept


async def publish(nc: NATS, aggregate: str, body: bytes, msg_id: str, deadline: float) -> int:
    """Publish until JetStream acknowledges (NATS may be down for a while); return the sequence.
    Every attempt carries the same message id: a retry of a stored command is a duplicate."""
    while time.monotonic() < deadline:
        try:
            reply = await nc.request(f"cc.commands.{aggregate}", body, timeout=2, headers={MSG_ID: msg_id})
            ack = json.loads(reply.data)
            if "seq" in ack:
                return int(ack["seq"])
        except Exception:  # noqa: BLE001 - down, restarting, no responders: try again
            pass
        await asyncio.sleep(0.2)  # back off before the next attempt; nothing to wait on while NATS is away
    raise TimeoutError("could not publish a command before the deadline")


def next_command(rng: random.Random, accounts: list[str], number: int) -> tuple[str, dict]:
    """One command; ``data.ref`` makes every body unique, so two equal bodies are one command twice."""
    account = rng.choice(accounts)
    roll = rng.random()
    ref = f"drive:{number}"
    base = {"accountNumber": account, "customerId": "C", "ref": ref}
    if roll < 0.2:
        items = [rng.randint(1, 9) for _ in range(rng.randint(2, 4))]
        return "tally", {"command_type": "add", "key": f"T{number % 5}", "data": {"items": items, "ref": ref}}
    if roll < 0.3:
        routing = "123456789" if rng.random() < 0.7 else "12"
        return "bankaccount", {"command_type": "wire_funds", "key": account, "data": {
            **base, "amount": rng.randint(1, 50), "wireTransactionId": f"W{number}",
            "targetRoutingNumber": routing, "targetAccountNumber": "EXT"}}
    if roll < 0.45:  # some large enough that their outcome depends on every command before them
        amount = rng.randint(1, 100) if rng.random() < 0.7 else rng.randint(500, 2500)
        return "bankaccount", {"command_type": "withdraw_funds", "key": account, "data": {**base, "amount": amount}}
    return "bankaccount", {"command_type": "deposit_funds", "key": account,
                           "data": {**base, "amount": rng.randint(1, 100)}}


async def quiet(exc: Exception) -> None:
    """Connection errors are expected while NATS is killed: publish() retries."""


def accounts_of(plan: Plan) -> list[str]:
    return [f"ACC{i}" for i in range(plan.accounts)]


async def drive(url: str, plan: Plan, sent: Sent, progress: Progress, spread: list[int], deadline: float) -> None:
    """Create the accounts, then send commands, about ``plan.rate`` per second from
    ``plan.senders`` senders (no catching up after a pause) until ``progress.end``, with the bad
    inputs ``spread`` over the planned commands."""
    rng = random.Random(plan.seed)
    accounts = accounts_of(plan)
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=quiet)
    try:
        for account in accounts:
            body = {"command_type": "create_account", "key": account,
                    "data": {"accountNumber": account, "initialBalance": 1000, "customerId": "C"}}
            msg_id = f"create:{account}"
            sent.commands[await publish(nc, "bankaccount", json.dumps(body).encode(), msg_id, deadline)] = msg_id
        numbers = itertools.count()
        bad_every = max(plan.commands // max(len(spread), 1), 1)
        interval = plan.senders / plan.rate

        async def sender() -> None:
            while True:
                await progress.clear_to_send()
                number = next(numbers)
                if number >= min(progress.end, plan.commands * MAX_LOAD):
                    return
                aggregate, body = next_command(rng, accounts, number)  # drawn in number order
                msg_id = body["data"]["ref"]
                seq = await publish(nc, aggregate, json.dumps(body).encode(), msg_id, deadline)
                sent.commands[seq] = msg_id
                if number % bad_every == 0 and number // bad_every < len(spread):
                    await throw(nc, sent, spread[number // bad_every], deadline)
                await progress.advance(seq)
                await asyncio.sleep(interval)  # pacing, not synchronisation

        await asyncio.gather(*(sender() for _ in range(plan.senders)))
    finally:
        await progress.finish()
        await nc.close()


async def throw(nc: NATS, sent: Sent, index: int, deadline: float) -> None:
    """Publish bad input ``index`` (with its own message id, as every command)."""
    msg_id = f"bad:{index}"
    sent.bad[await publish(nc, "bankaccount", BAD_INPUTS[index], msg_id, deadline)] = msg_id
