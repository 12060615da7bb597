"""Aggregates: commands become events against current state; events fold into state.

Correct where the original was not:
- state is caught up from the event log before a command is decided, so a command never sees
  stale state;
- a command's events are appended in one atomic batch guarded by the instance's last event
  sequence, so two daemons racing on one key cannot both append (the loser re-reads, retries);
- a redelivered command first looks in the log for events it already caused, so redelivery
  never appends twice; state records the last event folded in, so none is folded twice.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from nats.aio.msg import Msg

from ..failpoints import fail_point
from ..links import Interest
from ..naming import (
    COMMANDS_STREAM,
    EVENTS_STREAM,
    InvalidName,
    aggregate_state_key,
    check_token,
    command_subject,
    snake_case,
    stream_filter,
)
from ..runtime import Component, ComponentFailed, Decision, Event, RejectedByComponent
from ..store.deadletters import DeadLetters
from ..store.events import EventLog, LoggedEvent
from ..store.jetstream import PayloadTooLarge, WrongLastSequence
from ..store.results import ResultStore
from ..store.state import StateStore
from ..wire import (
    BadMessage,
    CloudEvent,
    CommandResult,
    RawCommand,
    new_event,
    parse_command,
)
from .base import (
    ConsumerSpec,
    KeyedLocks,
    KeyOrder,
    Poison,
    Retry,
    Settler,
    consumer_for,
    delivered_event,
    dispatch_by_key,
    to_component_event,
)

log = structlog.get_logger(__name__)

MAX_CONFLICT_RETRIES = 25
CLOCK_SKEW_MARGIN = timedelta(seconds=60)


@dataclass(frozen=True)
class CurrentState:
    value: str | None
    event_seq: int
    revision: int
    behind: bool  # the stored state missed events that were folded in just now


class AggregateWorker:
    """Handles commands (``AGG_CMD_{name}``) and keeps state current (``AGG_EVT_{name}``)."""

    def __init__(self, interest: Interest, component: Component, log_: EventLog,
                 states: StateStore, results: ResultStore, dead_letters: DeadLetters) -> None:
        assert interest.stream is not None
        self.interest = interest
        self.stream = interest.stream
        self._component = component
        self._log_store = log_
        self._states = states
        self._results = results
        self._locks = KeyedLocks()
        self._command_order = KeyOrder()
        self._logger = log.bind(component=component.name, aggregate=interest.name)
        self._settle_command = Settler(self.command_consumer().durable, component.name, interest.max_deliveries,
                                       dead_letters, self._logger, on_dead=self._answer_dead_command)
        self._settle_event = Settler(self.event_consumer().durable, component.name, interest.max_deliveries,
                                     dead_letters, self._logger)

    # -- consumers -----------------------------------------------------------------------------

    def command_consumer(self) -> ConsumerSpec:
        return consumer_for(self.interest, COMMANDS_STREAM, f"AGG_CMD_{self.interest.name}",
                            (command_subject(self.interest.name),))

    def event_consumer(self) -> ConsumerSpec:
        return consumer_for(self.interest, EVENTS_STREAM, self.interest.consumer_name, (stream_filter(self.stream),))

    async def dispatch_commands(self, batch: list[Msg], stopping: asyncio.Event) -> None:
        await dispatch_by_key(batch, _command_key, lambda m: self._settle_command(m, self.on_command),
                              stopping, self._command_order)

    async def dispatch_events(self, batch: list[Msg], stopping: asyncio.Event) -> None:
        await dispatch_by_key(batch, lambda m: m.subject.rsplit(".", 1)[-1],
                              lambda m: self._settle_event(m, self.on_event), stopping)

    # -- state ---------------------------------------------------------------------------------

    async def current_state(self, key: str) -> CurrentState:
        """Stored state, with any events it has not seen yet folded in."""
        # two cheap lookups at once in the common case; the batch read only when state is behind
        stored, log_last = await asyncio.gather(
            self._states.load(aggregate_state_key(self.interest.name, key)),
            self._log_store.last_seq(self.stream, key),
        )
        pending: list[LoggedEvent] = []
        if log_last > stored.event_seq:
            pending = await self._log_store.read(self.stream, key, after_seq=stored.event_seq)
        value = stored.value
        for event in pending:
            value = await self._component.apply_event(to_component_event(event), value)
        # the guard for the next append is the instance's last message, even one left out of the
        # fold for not being an event
        last = max(log_last, stored.event_seq, pending[-1].seq if pending else 0)
        return CurrentState(value, last, stored.revision, last > stored.event_seq)

    async def rebuild(self, key: str) -> str | None:
        """Recompute the instance's state from its whole event log and store it."""
        async with self._locks.hold(key):
            for _attempt in range(MAX_CONFLICT_RETRIES):
                stored = await self._states.load(aggregate_state_key(self.interest.name, key))
                value = None
                log_last = await self._log_store.last_seq(self.stream, key)
                events = await self._log_store.read(self.stream, key)
                for event in events:
                    value = await self._component.apply_event(to_component_event(event), value)
                try:
                    last = max(log_last, events[-1].seq if events else 0)
                    await self._states.save(aggregate_state_key(self.interest.name, key), value, last,
                                            stored.revision)
                    return value
                except WrongLastSequence:
                    continue  # a command landed meanwhile: fold again
        raise ComponentFailed(f"state of {key!r} kept changing during the rebuild")

    async def keys(self) -> list[str]:
        """Every key of this aggregate that has events."""
        return await self._log_store.keys(self.stream)

    async def _store(self, key: str, value: str | None, event_seq: int, revision: int) -> None:
        try:
            await self._states.save(aggregate_state_key(self.interest.name, key), value, event_seq, revision)
        except WrongLastSequence:
            pass  # another writer stored state as new or newer; readers catch up from the log

    # -- commands ------------------------------------------------------------------------------

    async def on_command(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        logger = self._logger.bind(command_seq=seq)
        try:
            command = parse_command(msg.data)
        except BadMessage as exc:
            raise Poison(str(exc)) from None  # answered by _answer_dead_command
        logger = logger.bind(key=command.key, command_type=command.command_type)
        async with self._locks.hold(command.key):
            try:
                result = await self._execute(command, seq, meta.num_delivered > 1, meta.timestamp)
            except ComponentFailed as exc:
                raise Retry(str(exc)) from None
        if result.status == "rejected":
            logger.info("command rejected", error=result.error)
        else:
            logger.debug("command accepted", events=result.events)
        await self._results.record(seq, result)

    async def _answer_dead_command(self, msg: Msg, reason: str) -> None:
        """A command that went to the dead letters still gets an outcome its client can read."""
        try:
            command: RawCommand | None = parse_command(msg.data)
        except BadMessage:
            command = None
        await self._results.record(msg.metadata.sequence.stream, CommandResult(
            status="rejected", aggregate=self.interest.name, error=reason,
            command_type=command.command_type if command else None, key=command.key if command else None,
        ))

    def _rejected(self, command: RawCommand, error: str) -> CommandResult:
        return CommandResult(status="rejected", aggregate=self.interest.name,
                             command_type=command.command_type, key=command.key, error=error)

    async def _execute(self, command: RawCommand, seq: int, redelivered: bool,
                       sent_at: datetime) -> CommandResult:
        causation = f"command:{seq}"
        for _attempt in range(MAX_CONFLICT_RETRIES):
            current = await self.current_state(command.key)
            if redelivered:
                done = await self._already_appended(command.key, causation, sent_at)
                if done is not None:
                    await self._store(command.key, current.value, current.event_seq, current.revision)
                    return self._accepted(command, done)
            try:
                decision = await self._component.decide(
                    self.interest.name, command.command_type, command.key, current.value,
                    json.dumps(command.data),
                )
            except RejectedByComponent as exc:
                if current.behind:
                    await self._store(command.key, current.value, current.event_seq, current.revision)
                return self._rejected(command, str(exc))
            if not decision.events:
                return self._accepted(command, [])
            cloud_events = [self._to_cloud_event(command.key, e) for e in decision.events]
            value = await self._fold(decision, cloud_events, current.value)
            try:
                seqs = await self._log_store.append(
                    self.stream, command.key, cloud_events,
                    expected_last_seq=current.event_seq, causation=causation,
                )
            except WrongLastSequence:
                self._logger.debug("append conflict; deciding again", key=command.key, command_seq=seq)
                continue  # someone appended first: decide again on the newer state
            except PayloadTooLarge as exc:
                raise ComponentFailed(f"component returned an event too large to store: {exc}") from None
            fail_point("aggregate.after_append")
            await self._store(command.key, value, seqs[-1], current.revision)
            fail_point("aggregate.after_state")
            return self._accepted(command, [e.type for e in cloud_events])
        raise ComponentFailed(f"gave up after {MAX_CONFLICT_RETRIES} concurrent-append conflicts")

    async def _fold(self, decision: Decision, cloud_events: list[CloudEvent], value: str | None) -> str | None:
        """The state after the events, folded from exactly what a replay of the log will fold."""
        replayed = [Event(cloud.type, self.stream, json.dumps(cloud.data)) for cloud in cloud_events]
        if decision.folded and replayed == decision.events:
            return decision.state  # the runtime folded these very events already
        for event in replayed:
            value = await self._component.apply_event(event, value)
        return value

    def _accepted(self, command: RawCommand, event_types: list[str]) -> CommandResult:
        return CommandResult(status="accepted", aggregate=self.interest.name,
                             command_type=command.command_type, key=command.key, events=event_types)

    def _to_cloud_event(self, key: str, event: Event) -> CloudEvent:
        if event.stream and event.stream != self.stream:
            raise ComponentFailed(
                f"aggregate {self.interest.name!r} may only append to its stream {self.stream!r}, "
                f"not {event.stream!r}"
            )
        try:
            event_type = check_token(snake_case(event.event_type), "event type")
            return new_event(event_type, self.stream, key, event.payload)
        except (InvalidName, BadMessage) as exc:
            raise ComponentFailed(f"component returned a malformed event: {exc}") from None

    async def _already_appended(self, key: str, causation: str, sent_at: datetime) -> list[str] | None:
        """Event types this command already appended before a crash, or None if it did not."""
        # the command's store time, less a margin for clock skew between stream leaders
        since = (sent_at - CLOCK_SKEW_MARGIN).isoformat().replace("+00:00", "Z")
        found = [e.event_type for e in await self._log_store.read(self.stream, key, since=since)
                 if e.causation == causation]
        return found or None

    # -- events --------------------------------------------------------------------------------

    async def on_event(self, msg: Msg) -> None:
        """Bring stored state up to this event, if a crash left it behind."""
        key = delivered_event(msg).key
        stored = await self._states.load(aggregate_state_key(self.interest.name, key))
        if stored.event_seq >= msg.metadata.sequence.stream:
            return
        async with self._locks.hold(key):
            try:
                current = await self.current_state(key)
            except ComponentFailed as exc:
                raise Retry(str(exc)) from None
            if current.behind:
                await self._store(key, current.value, current.event_seq, current.revision)


def _command_key(msg: Msg) -> str:
    try:
        return str(json.loads(msg.data).get("key", ""))
    except Exception:  # any body at all, even one nested deeper than the parser goes
        return ""
