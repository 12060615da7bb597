"""Aggregates on JetStream: the command consumer (``AGG_CMD_{name}``) and the event consumer
(``AGG_EVT_{name}``), adapting messages to the engine.

A command message becomes an ``engine.processor.Command`` (its parsed body, stream sequence,
redelivery and store time) whose ``CommandResult`` is recorded in CC_RESULTS; an event message asks
the repository to bring stored state up to it. The rules (current state, guarded appends, no
double append or fold) are the engine's; here are consumers, settling and outcomes.
"""

from __future__ import annotations

import asyncio

import structlog
from nats.aio.msg import Msg

from ..engine.persistence import EventLog, StateStore
from ..engine.processor import Command, CommandProcessor
from ..engine.repository import AggregateRepository
from ..links import Interest
from ..naming import (
    COMMANDS_STREAM,
    EVENTS_STREAM,
    InvalidName,
    command_filters,
    parse_command_subject,
    stream_filter,
)
from ..runtime import Component, ComponentFailed
from ..store.commands import CommandQueue, ordering_key
from ..store.deadletters import DeadLetters
from ..store.results import ResultStore
from ..tracing import TRACEPARENT, received, trace_id
from ..wire import BadMessage, CommandResult, KeyMismatch, RawCommand, parse_command
from .base import (
    ConsumerSpec,
    Poison,
    Retry,
    Settler,
    consumer_for,
    delivered_event,
    dispatch_by_key,
)
from .held import HeldCommands

log = structlog.get_logger(__name__)

# The command consumer fetches its next batch while the last is decided, so that the slowest key of
# a batch does not hold back the commands behind it; one key's order holds across them (workers.held).
COMMAND_BATCHES_AT_ONCE = 2


class AggregateWorker:
    """Handles commands (``AGG_CMD_{name}``) and keeps state current (``AGG_EVT_{name}``)."""

    def __init__(self, interest: Interest, component: Component, log_: EventLog,
                 states: StateStore, results: ResultStore, dead_letters: DeadLetters) -> None:
        assert interest.stream is not None
        self.interest = interest
        self.stream = interest.stream
        self.repository = AggregateRepository(interest.name, self.stream, component, log_, states)
        self._processor = CommandProcessor(self.repository, component)
        self._results = results
        self._command_order = CommandQueue(interest.name)
        self._held = HeldCommands(on_unsettled=self._command_order.unsettled)
        self._decided_elsewhere: set[int] = set()  # see _must_wait
        self._logger = log.bind(component=component.name, aggregate=interest.name)
        self._settle_command = Settler(self.command_consumer().durable, component.name, interest.max_deliveries,
                                       dead_letters, self._logger, on_dead=self._answer_dead_command)
        self._settle_event = Settler(self.event_consumer().durable, component.name, interest.max_deliveries,
                                     dead_letters, self._logger)

    # -- consumers -----------------------------------------------------------------------------

    def command_consumer(self) -> ConsumerSpec:
        return consumer_for(self.interest, COMMANDS_STREAM, f"AGG_CMD_{self.interest.name}",
                            command_filters(self.interest.name))

    def event_consumer(self) -> ConsumerSpec:
        return consumer_for(self.interest, EVENTS_STREAM, self.interest.consumer_name, (stream_filter(self.stream),))

    async def dispatch_commands(self, batch: list[Msg], stopping: asyncio.Event) -> None:
        """One fetched batch; the next may be dispatched beside it (``COMMAND_BATCHES_AT_ONCE``)."""
        try:
            await dispatch_by_key(batch, _command_key, lambda m: self._settle_command(m, self.on_command), stopping,
                                  must_wait=self._must_wait, finished=self._command_order.finished, held=self._held)
        finally:
            self._decided_elsewhere.difference_update(msg.metadata.sequence.stream for msg in batch)

    async def _must_wait(self, batch: list[Msg], held: dict[int, str | None] | None = None
                         ) -> dict[int, tuple[int, ...]]:
        """The order check, noting the commands that wait for earlier ones of their key held by
        another daemon: by their turn, the state kept here for that key is stale."""
        waiting = await self._command_order.must_wait(batch, held)
        self._decided_elsewhere.update(waiting)
        return waiting

    async def dispatch_events(self, batch: list[Msg], stopping: asyncio.Event) -> None:
        await dispatch_by_key(batch, lambda m: m.subject.rsplit(".", 1)[-1],
                              lambda m: self._settle_event(m, self.on_event), stopping)

    # -- commands ------------------------------------------------------------------------------

    async def on_command(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        logger = self._logger.bind(command_seq=seq)
        traceparent = received((msg.headers or {}).get(TRACEPARENT))
        subject_key = _subject_key(msg)
        try:
            command = parse_command(msg.data, subject_key)
        except KeyMismatch as exc:  # a client's error, not a fault: answered, never decided
            logger.warning("command rejected", key=subject_key, error=str(exc), trace_id=trace_id(traceparent))
            await self._results.record(seq, CommandResult(
                status="rejected", aggregate=self.interest.name, key=subject_key, error=str(exc),
                command_type=exc.command.command_type, traceparent=traceparent))
            return
        except BadMessage as exc:
            raise Poison(str(exc)) from None  # answered by _answer_dead_command
        logger = logger.bind(key=command.key, command_type=command.command_type, trace_id=trace_id(traceparent))
        may_be_decided = meta.num_delivered > 1 or self._results.may_be_recorded(seq)
        if may_be_decided and await self._results.recorded(seq, self.interest.name, command.key):
            # decided by an earlier delivery whose ack was lost: a rejection leaves no event to find,
            # so deciding it again could accept it now, after later commands of its key
            logger.info("command delivered again after its outcome was recorded; the outcome stands")
            return
        if seq in self._decided_elsewhere:  # deciding on the state kept here would only meet a conflict
            logger.debug("earlier commands of its key were decided elsewhere; its state is read afresh")
            self.repository.forget(command.key)
        try:
            result = await self._processor.process(
                Command(command, seq, meta.num_delivered > 1, meta.timestamp, traceparent))
        except ComponentFailed as exc:
            raise Retry(str(exc)) from None
        result = result.model_copy(update={"traceparent": traceparent})
        if result.status == "rejected":
            logger.info("command rejected", error=result.error)
        else:
            logger.debug("command accepted", events=result.events)
        await self._results.record(seq, result)

    async def _answer_dead_command(self, msg: Msg, reason: str) -> None:
        """A command that went to the dead letters still gets an outcome its client can read, under
        its subject's key if the subject names one (a per-key client may read only that key)."""
        try:
            command: RawCommand | None = parse_command(msg.data)
        except BadMessage:
            command = None
        key = _subject_key(msg) or (command.key if command else None)
        await self._results.record(msg.metadata.sequence.stream, CommandResult(
            status="rejected", aggregate=self.interest.name, error=reason,
            command_type=command.command_type if command else None, key=key,
            traceparent=received((msg.headers or {}).get(TRACEPARENT)),
        ))

    # -- events --------------------------------------------------------------------------------

    async def on_event(self, msg: Msg) -> None:
        """Bring stored state up to this event, if a crash left it behind."""
        event = delivered_event(msg, self.repository.signer)
        try:
            await self.repository.catch_up(event.key, event.seq)
        except ComponentFailed as exc:
            raise Retry(str(exc)) from None


def _command_key(msg: Msg) -> str | None:
    return ordering_key(msg.subject, msg.data)


def _subject_key(msg: Msg) -> str | None:
    """The key a command's subject names (``cc.commands.{aggregate}.{key}``), None on the plain one."""
    try:
        return parse_command_subject(msg.subject)[1]
    except InvalidName:
        return None
