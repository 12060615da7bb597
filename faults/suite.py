"""The fault suite: sustained load, the daemon killed with -9, its NATS server killed, bad input
thrown in; then an audit that nothing was lost and nothing doubled.

Load: deposits, withdrawals and wire transfers on many bank accounts (the process manager and
the gateway in the loop) and `tally` commands that append several events each. Faults, at random
moments: `kill -9` of the daemon (restarted), `kill -9` of its embedded nats-server (the daemon
starts it again), malformed commands. Audit, once every command has an outcome:

- lost: a command acknowledged by JetStream with no outcome, or accepted with fewer events in
  CC_EVENTS than it produced, or a wire transfer whose process never ended;
- duplicated: more events for a command than it produced, an event id twice, a process-manager
  command that reached an aggregate twice (the aggregate rejects the second reserve or commit);
- every aggregate instance's state equals the fold of its events through its component, and
  the projector's balances equal the aggregate's.

Run: ``.venv/bin/python -m faults.suite`` (``make faults``). Ends with one quotable line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from concordance_provider.build import build_component
from concordance_provider.daemon import load_component
from concordance_provider.manifest import load_manifest
from concordance_provider.nats_server import free_port
from concordance_provider.store.jetstream import read_all
from concordance_provider.workers.base import to_component_event
from concordance_provider.store.events import LoggedEvent
from tests.integration.harness import DaemonProcess

ROOT = Path(__file__).resolve().parents[1]
BANK = ROOT / "examples" / "bankaccount"
TALLY_WASM = ROOT / "faults" / "build" / "tally.wasm"
BAD_INPUTS = [
    b"{not json", b"\xff\xfe", b"[" * 50_000, b'{"key": "A1"}', b'{"command_type": "deposit_funds"}',
    b'{"command_type": "deposit_funds", "key": "a.>"}', b'{"command_type": "deposit_funds", "key": "*"}',
    b'{"command_type": "deposit_funds", "key": " "}', b'{"command_type": "launch", "key": "NOBODY"}',
]
PM_COMMANDS = {"reserve_funds", "commit_funds", "release_funds"}


@dataclass
class Plan:
    commands: int
    kills: int
    nats_restarts: int
    accounts: int = 12
    senders: int = 4
    seed: int = 7


@dataclass
class Sent:
    commands: dict[int, str] = field(default_factory=dict)  # CC_COMMANDS seq -> aggregate
    bad: list[int] = field(default_factory=list)
    wires: list[str] = field(default_factory=list)


def write_manifest(folder: Path) -> Path:
    text = (BANK / "app.yaml").read_text().replace("file://./build/", f"file://{BANK}/build/")
    text = text.replace("    - name: concordance\n", f"""    - name: tally
      type: component
      properties:
        image: file://{TALLY_WASM}
      traits:
        - type: link
          properties:
            target: concordance
            values: {{ROLE: aggregate, NAME: tally, INTEREST: tally}}

    - name: concordance
""")
    path = folder / "app.yaml"
    path.write_text(text)
    return path


async def publish(nc: NATS, aggregate: str, body: bytes, deadline: float) -> int:
    """Publish until JetStream acknowledges (NATS may be down for a while); return the sequence."""
    while time.monotonic() < deadline:
        try:
            reply = await nc.request(f"cc.commands.{aggregate}", body, timeout=2)
            ack = json.loads(reply.data)
            if "seq" in ack:
                return int(ack["seq"])
        except Exception:  # noqa: BLE001 - down, restarting, no responders: try again
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("could not publish a command before the deadline")


def next_command(rng: random.Random, accounts: list[str], number: int) -> tuple[str, dict]:
    account = rng.choice(accounts)
    roll = rng.random()
    base = {"accountNumber": account, "customerId": "C"}
    if roll < 0.2:
        items = [rng.randint(1, 9) for _ in range(rng.randint(2, 4))]
        return "tally", {"command_type": "add", "key": f"T{number % 5}", "data": {"items": items}}
    if roll < 0.3:
        wire = f"W{number}"
        routing = "123456789" if rng.random() < 0.7 else "12"
        return "bankaccount", {"command_type": "wire_funds", "key": account, "data": {
            **base, "amount": rng.randint(1, 50), "wireTransactionId": wire,
            "targetRoutingNumber": routing, "targetAccountNumber": "EXT"}}
    kind = "withdraw_funds" if roll < 0.45 else "deposit_funds"
    return "bankaccount", {"command_type": kind, "key": account, "data": {**base, "amount": rng.randint(1, 100)}}


async def drive(url: str, plan: Plan, sent: Sent, deadline: float) -> None:
    rng = random.Random(plan.seed)
    accounts = [f"ACC{i}" for i in range(plan.accounts)]
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        for account in accounts:
            body = {"command_type": "create_account", "key": account,
                    "data": {"accountNumber": account, "initialBalance": 1000, "customerId": "C"}}
            sent.commands[await publish(nc, "bankaccount", json.dumps(body).encode(), deadline)] = "bankaccount"
        queue = [next_command(rng, accounts, n) for n in range(plan.commands)]
        bad_every = max(plan.commands // len(BAD_INPUTS), 1)

        async def sender(share: list[tuple[int, tuple[str, dict]]]) -> None:
            for number, (aggregate, body) in share:
                seq = await publish(nc, aggregate, json.dumps(body).encode(), deadline)
                sent.commands[seq] = aggregate
                if body["command_type"] == "wire_funds":
                    sent.wires.append(body["data"]["wireTransactionId"])
                if number % bad_every == 0 and number // bad_every < len(BAD_INPUTS):
                    sent.bad.append(await publish(nc, "bankaccount", BAD_INPUTS[number // bad_every], deadline))
                await asyncio.sleep(rng.uniform(0, 0.01))

        numbered = list(enumerate(queue))
        await asyncio.gather(*(sender(numbered[i::plan.senders]) for i in range(plan.senders)))
    finally:
        await nc.close()


def server_pids(daemon: DaemonProcess) -> list[int]:
    return [e["pid"] for e in daemon.logs() if e.get("event") == "nats-server started"]


async def chaos(plan: Plan, start_daemon, state: dict, loading: asyncio.Task) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Kill the daemon or its NATS server at random moments while the load runs."""
    rng = random.Random(plan.seed + 1)
    faults = ["kill"] * plan.kills + ["nats"] * plan.nats_restarts
    rng.shuffle(faults)
    kills = restarts = 0
    for fault in faults:
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        daemon: DaemonProcess = state["daemon"]
        if fault == "kill":
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait(10)
            daemon.stop()
            await asyncio.sleep(0.5)  # its server follows it (parent-death signal)
            state["daemon"] = await asyncio.to_thread(start_daemon)
            kills += 1
        else:
            before = len(server_pids(daemon))
            os.kill(server_pids(daemon)[-1], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while len(server_pids(daemon)) == before and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            restarts += 1
    return kills, restarts


async def outcomes(nc: NATS, seqs: list[int], deadline: float) -> dict[int, dict]:
    kv = await nc.jetstream().key_value("CC_RESULTS")
    found: dict[int, dict] = {}
    while time.monotonic() < deadline:
        for seq in seqs:
            if seq not in found:
                try:
                    found[seq] = json.loads((await kv.get(str(seq))).value)
                except Exception:  # noqa: BLE001 - not there yet
                    pass
        if len(found) == len(seqs):
            break
        await asyncio.sleep(0.5)
    return found


async def quiesce(nc: NATS, deadline: float) -> None:
    """Wait until no consumer has anything pending or in flight (two looks in a row)."""
    js = nc.jetstream()
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        busy = 0
        for stream in ("CC_COMMANDS", "CC_EVENTS"):
            for info in await js.consumers_info(stream):
                busy += info.num_pending + info.num_ack_pending
        quiet = quiet + 1 if busy == 0 else 0
        await asyncio.sleep(1.0)


async def fold_matches(nc: NATS, manifest: Path, events: list[LoggedEvent]) -> list[str]:
    """Instances whose stored state differs from the fold of their events through the component."""
    kv = await nc.jetstream().key_value("CC_STATE")
    wrong = []
    for spec in load_manifest(manifest).components:
        if spec.interest.stream is None:
            continue
        component = await load_component(spec)
        try:
            by_key: dict[str, list[LoggedEvent]] = {}
            for event in events:
                if event.stream == spec.interest.stream:
                    by_key.setdefault(event.key, []).append(event)
            for key, mine in by_key.items():
                value = None
                for event in mine:
                    value = await component.apply_event(to_component_event(event), value)
                stored = (await kv.get(f"agg.{spec.interest.name}.{key}")).value.decode()
                if json.loads(stored) != json.loads(value or "null"):
                    wrong.append(f"{spec.interest.name}.{key}")
        finally:
            await component.close()
    return wrong


async def projections_match(nc: NATS, accounts: list[str], deadline: float) -> list[str]:
    state = await nc.jetstream().key_value("CC_STATE")
    model = await nc.jetstream().key_value("CC_RM_bankaccount_projector")
    differing = accounts
    while differing and time.monotonic() < deadline:
        differing = []
        for account in accounts:
            balance = json.loads((await state.get(f"agg.bankaccount.{account}")).value)["balance"]
            try:
                projected = json.loads((await model.get(f"balance.{account}")).value)["balance"]
            except Exception:  # noqa: BLE001
                projected = None
            if projected != balance:
                differing.append(account)
        await asyncio.sleep(0.5)
    return differing


async def audit(url: str, manifest: Path, plan: Plan, sent: Sent, deadline: float) -> dict[str, object]:
    nc = await nats.connect(url)
    try:
        results = await outcomes(nc, list(sent.commands) + sent.bad, deadline)
        await quiesce(nc, deadline)  # process managers, gateway and projector catch up
        stored = [LoggedEvent.from_message(m) for m in await read_all(nc, "CC_EVENTS", "cc.events.>")]
        per_command = Counter(e.causation for e in stored if e.causation and e.causation.startswith("command:"))
        lost = [s for s in sent.commands if s not in results]
        duplicated = 0
        for seq, outcome in results.items():
            produced = len(outcome.get("events", [])) if outcome["status"] == "accepted" else 0
            appended = per_command.get(f"command:{seq}", 0)
            if appended < produced:
                lost.append(seq)
            duplicated += max(appended - produced, 0)
        duplicated += len(stored) - len({e.cloud_event.id for e in stored})
        pm_rejections = [o for o in results.values() if o.get("command_type") in PM_COMMANDS and o["status"] == "rejected"]
        duplicated += len(pm_rejections)
        ended = {e.cloud_event.data.get("wireTransferId") for e in stored if e.event_type in ("funds_committed", "funds_released")}
        initiated = {e.cloud_event.data.get("wireTransferId") for e in stored if e.event_type == "wire_transfer_initiated"}
        unfinished = sorted(initiated - ended)
        bad_answered = sum(results.get(s, {}).get("status") == "rejected" for s in sent.bad)
        return {
            "lost": len(lost) + len(unfinished), "duplicated": duplicated, "unfinished_wires": unfinished,
            "bad_answered": bad_answered, "events": len(stored),
            "fold_mismatches": await fold_matches(nc, manifest, stored),
            "projection_mismatches": await projections_match(nc, [f"ACC{i}" for i in range(plan.accounts)], deadline),
        }
    finally:
        await nc.close()


async def run(plan: Plan, workdir: Path, budget: float) -> int:
    deadline = time.monotonic() + budget
    build_component(ROOT / "faults" / "tally", "aggregate", TALLY_WASM)
    manifest = write_manifest(workdir)
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    runs = iter(range(1000))

    def start_daemon() -> DaemonProcess:
        daemon = DaemonProcess(manifest, workdir / f"daemon-{next(runs)}.log",
                               "--state-dir", str(workdir / "state"), "--port", str(port))
        daemon.wait_ready()
        return daemon

    state = {"daemon": start_daemon()}
    sent = Sent()
    try:
        loading = asyncio.create_task(drive(url, plan, sent, deadline))
        kills, restarts = await chaos(plan, start_daemon, state, loading)
        await loading
        report = await audit(url, manifest, plan, sent, deadline)
    finally:
        state["daemon"].stop()
    ok = (report["lost"] == 0 and report["duplicated"] == 0 and not report["fold_mismatches"]
          and not report["projection_mismatches"] and report["bad_answered"] == len(sent.bad))
    print(json.dumps(report, indent=2), file=sys.stderr)
    print(f"faults: {len(sent.commands)} commands, {kills} kills, {restarts} NATS restarts, "
          f"{len(sent.bad)} bad inputs, lost {report['lost']}, duplicated {report['duplicated']}"
          f"{'' if ok else '  FAILED'}")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1500)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--nats-restarts", type=int, default=2)
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for the whole run")
    args = parser.parse_args()
    plan = Plan(args.commands, args.kills, args.nats_restarts)
    with tempfile.TemporaryDirectory(prefix="concordance-faults-") as tmp:
        sys.exit(asyncio.run(run(plan, Path(tmp), args.budget)))


if __name__ == "__main__":
    main()
