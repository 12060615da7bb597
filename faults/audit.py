"""The fault suite's audit: every command ever stored in CC_COMMANDS, whoever sent it, is held
against what deciding the commands one by one in stream order gives.

CC_COMMANDS is a work queue (a handled command is deleted), so before the load the suite mirrors
it into ``CC_COMMANDS_AUDIT``, a stream with limits retention; a JetStream mirror keeps the
origin's sequence numbers, so the audit reads every command with its sequence, and each sequence
1..last must have an outcome in CC_RESULTS. Findings:

- lost: a sequence without an outcome; an accepted command with fewer events in CC_EVENTS than
  its outcome names; a command the driver had acknowledged under a sequence that holds another;
  a malformed command without its dead letter; a wire transfer whose process never ended (unless
  one of its commands was rejected: rightly, or counted as wrongly rejected already);
- duplicated: a command stored twice (the same message id, or the same subject and body: every
  body the driver sends is unique, and a process manager sends each of its commands once); more
  events for a command than its outcome names; an event id twice; a second answer from the other
  bank for one transfer; a second dead letter for one command;
- wrongly rejected: a rejection that sequential decision in stream order does not reproduce
  (reason included), such as a command dead-lettered during an outage, or a good command rejected
  on lost or stale state; a malformed command rejected for anything but its own defect;
- out of order: an acceptance that sequential decision does not reproduce (decided on a state
  other than its predecessors give), or events of one instance appended in an order other than
  their commands' stream order (header ``Concordance-Causation: command:{seq}``).

The replay decides each command through the real component, in-process, on the state its
predecessors' stored events fold to, so one wrong decision is counted once and not again for
every command after it. The audit also checks that every instance's state equals the fold of its
events and that the projector's balances equal the aggregate's.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig, StreamSource
from nats.js.errors import KeyNotFoundError

from concordance_provider.daemon import load_component
from concordance_provider.links import Role
from concordance_provider.manifest import load_manifest
from concordance_provider.naming import (
    COMMANDS_STREAM,
    DEADLETTER_PREFIX,
    DEADLETTER_STREAM,
    EVENTS_STREAM,
    STATE_BUCKET,
    snake_case,
)
from concordance_provider.runtime import Component, RejectedByComponent
from concordance_provider.store.events import LoggedEvent
from concordance_provider.store.jetstream import StoredMessage, read_all
from concordance_provider.store.results import stored_results
from concordance_provider.wire import BadMessage, RawCommand, parse_command
from concordance_provider.workers.base import to_component_event

from .load import MSG_ID, Sent

AUDIT_STREAM = "CC_COMMANDS_AUDIT"
PM_PREFIX = "pm:"  # message ids of process-manager commands: pm:{name}:{event_seq}:{i}
SHOWN = 12  # findings listed per kind in the report
SETTLE_TIMEOUT = 30.0


async def mirror_commands(js: JetStreamContext, timeout: float = SETTLE_TIMEOUT) -> None:
    """Mirror CC_COMMANDS into AUDIT_STREAM and wait until the mirror is live. While a mirror
    is attached, the work queue keeps each command until the mirror has it."""
    await js.add_stream(StreamConfig(
        name=AUDIT_STREAM, mirror=StreamSource(name=COMMANDS_STREAM), retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE, allow_direct=True,
    ))
    deadline = time.monotonic() + timeout
    while True:
        mirror = (await js.stream_info(AUDIT_STREAM)).mirror
        if mirror is not None and mirror.active is not None and mirror.active >= 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the mirror of {COMMANDS_STREAM} did not become active in {timeout}s")
        await asyncio.sleep(0.1)


@dataclass
class Findings:
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    wrongly_rejected: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)
    unaudited: list[int] = field(default_factory=list)  # sequences the mirror never received

    def counts(self) -> dict[str, int]:
        return {"lost": len(self.lost), "duplicated": len(self.duplicated),
                "wrongly_rejected": len(self.wrongly_rejected), "out_of_order": len(self.out_of_order),
                "unaudited": len(self.unaudited)}

    def shown(self) -> dict[str, list[Any]]:
        return {name: sorted(values, key=_first_number)[:SHOWN] for name, values in vars(self).items() if values}


def _first_number(finding: str | int) -> int:
    if isinstance(finding, int):
        return finding
    digits = re.search(r"\d+", finding)
    return int(digits.group()) if digits else 0


@dataclass(frozen=True)
class Command:
    seq: int
    aggregate: str
    msg_id: str | None
    body: bytes
    parsed: RawCommand | None
    malformed: str | None  # the reason a malformed body must be rejected with

    @classmethod
    def of(cls, stored: StoredMessage) -> "Command":
        try:
            parsed, malformed = parse_command(stored.data), None
        except BadMessage as exc:
            parsed, malformed = None, str(exc)
        return cls(stored.seq, stored.subject.split(".", 2)[2], stored.headers.get(MSG_ID), stored.data,
                   parsed, malformed)


@dataclass
class Audit:
    commands: list[Command]
    results: dict[int, dict[str, Any]]
    events: list[LoggedEvent]
    dead_letters: list[dict[str, Any]]
    components: dict[str, tuple[str, Component]]  # aggregate name -> (its stream, component)
    findings: Findings = field(default_factory=Findings)
    refused: set[str] = field(default_factory=set)  # wires one of whose commands was rejected
    late: set[int] = field(default_factory=set)  # commands whose events came after a later command's

    async def run(self, last: int, sent: Sent) -> Findings:
        self._coverage(last, sent)
        self._duplicate_commands()
        self._event_counts()
        self._event_order()
        self._dead_letters()
        await self._replay()
        self._processes()
        return self.findings

    def _coverage(self, last: int, sent: Sent) -> None:
        by_seq = {c.seq: c for c in self.commands}
        self.findings.unaudited = sorted(set(range(1, last + 1)) - set(by_seq))
        for seq in range(1, last + 1):
            if seq not in self.results:
                self.findings.lost.append(f"command {seq}: no outcome")
        for seq, msg_id in sent.all().items():
            stored = by_seq.get(seq)
            if stored is not None and stored.msg_id != msg_id:
                self.findings.lost.append(f"command {msg_id} acknowledged as {seq}, which holds {stored.msg_id}")

    def _duplicate_commands(self) -> None:
        ids: dict[str, int] = {}
        bodies: dict[tuple[str, bytes], int] = {}
        for command in self.commands:
            first = ids.get(command.msg_id) if command.msg_id else None
            first = first or bodies.get((command.aggregate, command.body))
            if first is not None:
                self.findings.duplicated.append(f"command {command.seq} repeats command {first} ({command.msg_id})")
                continue
            if command.msg_id:
                ids[command.msg_id] = command.seq
            bodies[(command.aggregate, command.body)] = command.seq

    def _event_counts(self) -> None:
        appended = Counter(e.causation for e in self.events if e.causation)
        for seq, outcome in self.results.items():
            produced = len(outcome.get("events", [])) if outcome.get("status") == "accepted" else 0
            stored = appended.get(f"command:{seq}", 0)
            if stored < produced:
                self.findings.lost.append(f"command {seq}: {produced - stored} of its {produced} events missing")
            self.findings.duplicated.extend(
                f"command {seq}: event beyond the {produced} its outcome names" for _ in range(stored - produced))
        ids = Counter(e.cloud_event.id for e in self.events)
        self.findings.duplicated.extend(f"event id {i} stored {n} times" for i, n in ids.items() for _ in range(n - 1))
        answers = Counter(e.key for e in self.events if e.stream == "interbank")
        self.findings.duplicated.extend(
            f"wire {w}: answered {n} times" for w, n in answers.items() for _ in range(n - 1))

    def _event_order(self) -> None:
        """Events of one instance must follow their commands' stream order."""
        latest: dict[tuple[str, str], int] = {}
        overtaken_by: dict[int, int] = {}
        for event in self.events:
            cause = _command_seq(event)
            if cause is None:
                continue
            instance = (event.stream, event.key)
            if cause < latest.get(instance, 0):
                overtaken_by.setdefault(cause, latest[instance])
            latest[instance] = max(latest.get(instance, 0), cause)
        self.late = set(overtaken_by)
        self.findings.out_of_order.extend(
            f"command {seq}: its events were appended after those of command {later}"
            for seq, later in sorted(overtaken_by.items()))

    def _dead_letters(self) -> None:
        """Each malformed command is kept as one dead letter."""
        kept = Counter(d.get("stream_seq") for d in self.dead_letters if d.get("stream") == COMMANDS_STREAM)
        for command in self.commands:
            if command.parsed is None:
                if not kept.get(command.seq):
                    self.findings.lost.append(f"command {command.seq}: malformed, and no dead letter kept")
                self.findings.duplicated.extend(
                    f"command {command.seq}: dead letter stored again" for _ in range(kept.get(command.seq, 0) - 1))

    async def _replay(self) -> None:
        caused: dict[int, list[LoggedEvent]] = defaultdict(list)
        for event in self.events:
            cause = _command_seq(event)
            if cause is not None:
                caused[cause].append(event)
        instances: dict[tuple[str, str], list[Command]] = defaultdict(list)
        for command in self.commands:
            outcome = self.results.get(command.seq)
            if outcome is None:
                continue  # counted lost
            if command.parsed is None:
                if outcome.get("status") != "rejected" or outcome.get("error") != command.malformed:
                    self.findings.wrongly_rejected.append(
                        f"command {command.seq}: malformed ({command.malformed}) but {_said(outcome)}")
                continue
            if command.aggregate in self.components:
                instances[(command.aggregate, command.parsed.key)].append(command)
        for (aggregate, key), commands in instances.items():
            component = self.components[aggregate][1]
            state: str | None = None
            for command in commands:
                await self._judge(aggregate, command, state, component)
                for event in caused.get(command.seq, []):
                    state = await component.apply_event(to_component_event(event), state)

    async def _judge(self, aggregate: str, command: Command, state: str | None, component: Component) -> None:
        assert command.parsed is not None
        parsed, outcome = command.parsed, self.results[command.seq]
        try:
            decision = await component.decide(aggregate, parsed.command_type, parsed.key, state,
                                              json.dumps(parsed.data))
            expected: dict[str, Any] = {"status": "accepted",
                                        "events": [snake_case(e.event_type) for e in decision.events]}
        except RejectedByComponent as exc:
            expected = {"status": "rejected", "error": str(exc)}
        said = f"command {command.seq} ({parsed.command_type} {parsed.key}): {_said(outcome)}; " \
               f"in stream order {_said(expected)}"
        if outcome.get("key") != parsed.key or outcome.get("command_type") != parsed.command_type:
            self.findings.lost.append(f"command {command.seq}: outcome is another command's: {_said(outcome)}")
        elif outcome.get("status") == "rejected":
            if expected != {"status": "rejected", "error": outcome.get("error")}:
                self.findings.wrongly_rejected.append(said)
            if "wireTransferId" in parsed.data:  # a process manager's reserve, commit or release
                self.refused.add(str(parsed.data["wireTransferId"]))
        elif expected != {"status": "accepted", "events": outcome.get("events", [])}:
            if command.seq not in self.late:  # counted already
                self.findings.out_of_order.append(said)

    def _processes(self) -> None:
        """Every wire transfer's process ends, unless one of its commands was rejected (rightly,
        or counted as wrongly rejected already)."""
        def wires(*types: str) -> set[str]:
            return {str(e.cloud_event.data.get("wireTransferId")) for e in self.events if e.event_type in types}
        unfinished = wires("wire_transfer_initiated") - wires("funds_committed", "funds_released")
        self.findings.lost.extend(
            f"wire {w}: its process never ended" for w in sorted(unfinished - self.refused))


def _command_seq(event: LoggedEvent) -> int | None:
    if event.causation and event.causation.startswith("command:"):
        return int(event.causation.split(":", 1)[1])
    return None


def _said(outcome: dict[str, Any]) -> str:
    if outcome.get("status") == "accepted":
        return f"accepted {outcome.get('events', [])}"
    return f"rejected: {outcome.get('error')}"


# -- waiting for the system to settle --------------------------------------------------------

async def outcomes(nc: NATS, seqs: list[int], deadline: float) -> dict[int, dict]:
    """The outcomes of ``seqs`` in CC_RESULTS, read whole until all are there or ``deadline``."""
    found: dict[int, dict] = {}
    while time.monotonic() < deadline:
        stored = await stored_results(nc)
        found = {seq: json.loads(stored[seq]) for seq in seqs if seq in stored}
        if len(found) == len(seqs):
            break
        await asyncio.sleep(0.5)
    return found


async def quiesce(nc: NATS, deadline: float) -> None:
    """Wait until no durable consumer has anything pending or in flight and no stream grows,
    two looks in a row (the mirror's own consumer is not durable)."""
    js = nc.jetstream()
    streams = (COMMANDS_STREAM, EVENTS_STREAM)
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        before = [(await js.stream_info(s)).state.last_seq for s in streams]
        busy = 0
        for stream in streams:
            busy += sum(info.num_pending + info.num_ack_pending
                        for info in await js.consumers_info(stream) if info.config.durable_name)
        after = [(await js.stream_info(s)).state.last_seq for s in streams]
        quiet = quiet + 1 if busy == 0 and before == after else 0
        await asyncio.sleep(0.5)


async def settle(nc: NATS, deadline: float) -> tuple[int, dict[int, dict]]:
    """Once nothing is in flight and no new command appears: the last CC_COMMANDS sequence and
    the outcomes of 1..last (process managers send commands after the load's have outcomes)."""
    js = nc.jetstream()
    last, results = -1, {}
    while time.monotonic() < deadline:
        await quiesce(nc, deadline)
        now = (await js.stream_info(COMMANDS_STREAM)).state.last_seq
        results = await outcomes(nc, list(range(1, now + 1)), deadline)
        if now == last:
            break
        last = now
    mirror_deadline = min(deadline, time.monotonic() + SETTLE_TIMEOUT)
    while (await js.stream_info(AUDIT_STREAM)).state.last_seq < last and time.monotonic() < mirror_deadline:
        await asyncio.sleep(0.2)
    return last, results


# -- state and read model ----------------------------------------------------------------------

async def fold_mismatches(nc: NATS, components: dict[str, tuple[str, Component]],
                          events: list[LoggedEvent]) -> list[str]:
    """Instances whose stored state differs from the fold of their events through the component."""
    kv = await nc.jetstream().key_value(STATE_BUCKET)
    wrong = []
    for name, (stream, component) in components.items():
        by_key: dict[str, list[LoggedEvent]] = defaultdict(list)
        for event in events:
            if event.stream == stream:
                by_key[event.key].append(event)
        for key, mine in by_key.items():
            value = None
            for event in mine:
                value = await component.apply_event(to_component_event(event), value)
            try:
                stored = json.loads((await kv.get(f"agg.{name}.{key}")).value or b"null")
            except KeyNotFoundError:
                stored = None
            if stored != json.loads(value or "null"):
                wrong.append(f"{name}.{key}")
    return wrong


async def projection_mismatches(nc: NATS, accounts: list[str], timeout: float = SETTLE_TIMEOUT) -> list[str]:
    """Accounts whose projected balance differs from the aggregate's (given time to catch up)."""
    state = await nc.jetstream().key_value(STATE_BUCKET)
    model = await nc.jetstream().key_value("CC_RM_bankaccount_projector")
    deadline = time.monotonic() + timeout
    differing = accounts
    while differing and time.monotonic() < deadline:
        differing = []
        for account in accounts:
            balance = json.loads((await state.get(f"agg.bankaccount.{account}")).value)["balance"]
            try:
                projected = json.loads((await model.get(f"balance.{account}")).value)["balance"]
            except KeyNotFoundError:
                projected = None
            if projected != balance:
                differing.append(account)
        if differing:
            await asyncio.sleep(0.5)
    return differing


# -- the whole audit -----------------------------------------------------------------------------

async def load_aggregates(manifest: Path) -> dict[str, tuple[str, Component]]:
    found = {}
    for spec in load_manifest(manifest).components:
        if spec.interest.role == Role.AGGREGATE and spec.interest.stream is not None:
            found[spec.interest.name] = (spec.interest.stream, await load_component(spec))
    return found


async def audit(url: str, manifest: Path, accounts: list[str], sent: Sent, deadline: float) -> dict[str, Any]:
    nc = await nats.connect(url)
    components = await load_aggregates(manifest)
    try:
        last, results = await settle(nc, deadline)
        commands = [Command.of(m) for m in await read_all(nc, AUDIT_STREAM, "cc.commands.*") if m.seq <= last]
        events = [LoggedEvent.from_message(m) for m in await read_all(nc, EVENTS_STREAM, "cc.events.>")]
        dead = [json.loads(m.data) for m in await read_all(nc, DEADLETTER_STREAM, f"{DEADLETTER_PREFIX}.>")]
        findings = await Audit(commands, results, events, dead, components).run(last, sent)
        return {
            "commands": last,
            "from_process_managers": sum(1 for c in commands if (c.msg_id or "").startswith(PM_PREFIX)),
            "bad_inputs": len(sent.bad), "events": len(events),
            "rejected": sum(1 for o in results.values() if o.get("status") == "rejected"),
            **findings.counts(), "findings": findings.shown(),
            "fold_mismatches": await fold_mismatches(nc, components, events),
            "projection_mismatches": await projection_mismatches(nc, accounts),
        }
    finally:
        for _, component in components.values():
            await component.close()
        await nc.close()
