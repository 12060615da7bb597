"""A daemon crashed (or a call failed) at each failpoint under load: after a restart every
promise the point guards still holds.

Each case runs the same load (accounts, deposits, several-event tallies, wire transfers through
the process manager and gateway, malformed commands) against a daemon with one failpoint armed,
restarts without it when it crashed, then audits everything a user could check: one outcome per
command, every good command accepted, each command's events stored exactly once, states equal
to their folds, read models equal to state, each process-manager command sent once, one dead
letter per malformed command and nothing left in the queue.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from concordance_provider.build import build_component
from concordance_provider.failpoints import CRASH_EXIT_CODE, ENV
from concordance_provider.store.jetstream import read_all
from concordance_provider.store.results import stored_results
from faults.suite import with_tally

from .harness import DaemonProcess, client, eventually, example_manifest, kv_json, nats_server, result, send

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TALLY_WASM = ROOT / "tests" / "components" / "build" / "tally.wasm"
ACCOUNTS = [f"FP{i}" for i in range(4)]
OPENING = 1000
DEPOSITS = 40
TALLIES = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 1], [2, 3, 4]]
WIRES = {"WFP1": ("FP0", 30), "WFP2": ("FP1", 45)}
ACK_WAIT_MS = 3000
MALFORMED = [b"{not json", b'{"command_type": "deposit_funds"}']


@dataclass(frozen=True)
class Case:
    failpoint: str
    crashes: bool

    def __str__(self) -> str:
        return self.failpoint


CASES = [
    Case("aggregate.after_append=crash@8", True),
    Case("aggregate.after_append=error@3", False),
    Case("aggregate.after_state=crash@8", True),
    Case("events.mid_batch=crash@2", True),
    Case("events.mid_batch=error@1", False),
    Case("process_manager.after_publish=crash@1", True),
    Case("process_manager.after_publish=error@2", False),
    Case("deadletter.before_store=crash@1", True),
    Case("deadletter.before_store=error@1", False),
    Case("deadletter.after_store=crash@1", True),
    # the load's events reach the projectors in a handful of batches (each waits 20 ms for more):
    # the second commit comes in every run, with the first one's writes already stored
    Case("read_model.before_commit=crash@2", True),
]


@dataclass
class Load:
    good: dict[int, str] = field(default_factory=dict)  # CC_COMMANDS seq -> command type
    malformed: list[int] = field(default_factory=list)
    deposited: Counter = field(default_factory=Counter)


def manifest_with_tally(folder: Path) -> Path:
    build_component(ROOT / "faults" / "tally", "aggregate", TALLY_WASM)
    # a short ack wait: what a crashed daemon held comes back within seconds
    path = example_manifest(folder, {f"NAME: {name}": f"ACK_WAIT_MS: {ACK_WAIT_MS}" for name in (
        "bankaccount", "bankaccount_projector", "interbankxfer", "otherbank_gateway")})
    path.write_text(with_tally(path.read_text(), TALLY_WASM, f', ACK_WAIT_MS: "{ACK_WAIT_MS}"'))
    return path


async def drive(nc: NATS) -> Load:
    load = Load()
    for account in ACCOUNTS:
        load.good[await send(nc, "bankaccount", {"command_type": "create_account", "key": account, "data": {
            "accountNumber": account, "initialBalance": OPENING, "customerId": "C"}})] = "create_account"

    async def deposit(n: int) -> None:
        account = ACCOUNTS[n % len(ACCOUNTS)]
        amount = n + 1
        seq = await send(nc, "bankaccount", {"command_type": "deposit_funds", "key": account, "data": {
            "accountNumber": account, "amount": amount, "customerId": "C"}})
        load.good[seq] = "deposit_funds"
        load.deposited[account] += amount

    async def tally(n: int, items: list[int]) -> None:
        seq = await send(nc, "tally", {"command_type": "add", "key": f"T{n % 2}", "data": {"items": items}})
        load.good[seq] = "add"

    async def wire(wire_id: str, account: str, amount: int) -> None:
        seq = await send(nc, "bankaccount", {"command_type": "wire_funds", "key": account, "data": {
            "accountNumber": account, "customerId": "C", "amount": amount, "wireTransactionId": wire_id,
            "targetRoutingNumber": "123456789", "targetAccountNumber": "EXT"}})
        load.good[seq] = "wire_funds"

    async def malformed(body: bytes) -> None:
        load.malformed.append(await send(nc, "bankaccount", body))

    await asyncio.gather(
        *(deposit(n) for n in range(DEPOSITS)),
        *(tally(n, items) for n, items in enumerate(TALLIES)),
        *(wire(w, account, amount) for w, (account, amount) in WIRES.items()),
        *(malformed(body) for body in MALFORMED),
    )
    return load


def wait_for_crash(process: DaemonProcess, timeout: float = 90.0) -> int:
    deadline = time.monotonic() + timeout
    while process.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return process.process.poll() if process.process.poll() is not None else -1


async def stored_events(nc: NATS) -> list:
    return await read_all(nc, "CC_EVENTS", "cc.events.>")


async def all_results(nc: NATS) -> dict[int, dict]:
    return {seq: json.loads(value) for seq, value in (await stored_results(nc)).items()}


def partial_tallies(events: list) -> list[str]:
    """Commands of the several-event aggregate with only some of their events stored."""
    by_command = Counter(e.headers.get("Concordance-Causation") for e in events if ".tally." in e.subject)
    sizes = {len(items) for items in TALLIES}
    return [c for c, n in by_command.items() if n not in sizes]


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_every_promise_holds_after_a_failpoint(case: Case, example_components, tmp_path):
    manifest = manifest_with_tally(tmp_path)
    with nats_server(tmp_path) as server:
        args = ("--nats-url", server.url)
        first = DaemonProcess(manifest, tmp_path / "armed.log", *args, env={ENV: case.failpoint})
        daemons = [first]
        try:
            first.wait_ready()
            async with client(server.url) as nc:
                load = await drive(nc)
                if case.crashes:
                    code = await asyncio.to_thread(wait_for_crash, first)
                    assert code == CRASH_EXIT_CODE, f"the failpoint never fired:\n{first.log_path.read_text()[-3000:]}"
                    assert partial_tallies(await stored_events(nc)) == [], "a crash left half a command's events"
                    second = DaemonProcess(manifest, tmp_path / "restarted.log", *args)
                    daemons.append(second)
                    second.wait_ready()
                else:
                    assert any(e.get("event") for e in first.logs()), "the daemon logged nothing"
                await audit(nc, load)
                if not case.crashes:
                    assert first.process.poll() is None, "an error failpoint must not stop the daemon"
        finally:
            for process in daemons:
                process.stop()


async def audit(nc: NATS, load: Load) -> None:
    outcomes = {seq: await result(nc, seq, timeout=90) for seq in [*load.good, *load.malformed]}
    wrongly_rejected = {seq: o for seq, o in outcomes.items() if seq in load.good and o["status"] != "accepted"}
    assert wrongly_rejected == {}
    assert all(outcomes[seq]["status"] == "rejected" for seq in load.malformed)

    # wire transfers end (reserve, then commit), so every balance is final
    for account in ACCOUNTS:
        wired = sum(amount for acc, amount in WIRES.values() if acc == account)
        expected = OPENING + load.deposited[account] - wired
        state = await eventually(lambda: kv_json(nc, "CC_STATE", f"agg.bankaccount.{account}"),
                                 lambda s: s is not None and s["balance"] == expected and not s.get("reservations"),
                                 timeout=90)
        assert state["balance"] == expected, (account, state)
        projected = await eventually(lambda: kv_json(nc, "CC_RM_bankaccount_projector", f"balance.{account}"),
                                     lambda p: p is not None and p["balance"] == expected, timeout=60)
        assert projected["balance"] == expected, (account, projected)

    events = await stored_events(nc)
    ids = [json.loads(e.data)["id"] for e in events]
    assert len(ids) == len(set(ids)), "an event was stored twice"
    per_command = Counter(e.headers.get("Concordance-Causation") for e in events)
    results = await all_results(nc)
    for seq, outcome in results.items():
        if outcome["status"] == "accepted":
            assert per_command[f"command:{seq}"] == len(outcome["events"]), (seq, outcome)
    assert partial_tallies(events) == []
    for key in ("T0", "T1"):
        items = [v for n, items in enumerate(TALLIES) if f"T{n % 2}" == key for v in items]
        state = await kv_json(nc, "CC_STATE", f"agg.tally.{key}")
        assert state == {"count": len(items), "total": sum(items)}

    # process-manager commands: each sent once, each accepted
    sent_by_pm = [o for seq, o in results.items() if seq not in outcomes]
    assert Counter(o["command_type"] for o in sent_by_pm) == {"reserve_funds": len(WIRES), "commit_funds": len(WIRES)}
    assert all(o["status"] == "accepted" for o in sent_by_pm), sent_by_pm

    letters = [json.loads(m.data) for m in await read_all(nc, "CC_DEADLETTER", "cc.deadletter.>")]
    assert sorted(letter["stream_seq"] for letter in letters) == sorted(load.malformed)
    assert (await nc.jetstream().stream_info("CC_COMMANDS")).state.messages == 0
