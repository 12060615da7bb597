"""Commands become events: decide on current state, check, fold, append under the guard, save.

A parsed command in, a ``CommandResult`` out; no message transport. Outcomes keep their meaning:
a rejection by the component is a result; ``ComponentFailed`` is a fault the caller retries and in
the end dead-letters; any other exception is an outage, retried without counting.

- **current state**: the repository folds in any event the stored state has not seen;
- **one writer wins**: the append expects the instance's last sequence; if another writer
  appended first, the command is decided again on the newer state;
- **no double append**: a redelivered command first looks for events it already caused;
- **fold what is stored**: the state saved is folded from the events' stored form, or taken from
  the component's own fold only when its events are exactly those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import structlog

from ..failpoints import fail_point
from ..metrics import APPEND_CONFLICTS
from ..tracing import child_of
from ..runtime import Component, ComponentFailed, Decision, Event, RejectedByComponent
from ..wire import BadMessage, CommandResult, RawCommand
from .mapper import EventMessage, LoggedEvent, stored_form, to_cloud_event, to_component, to_message
from .persistence import AlreadyAppended, AppendConflict, EventTooLarge
from .repository import AggregateRepository

log = structlog.get_logger(__name__)

MAX_CONFLICT_RETRIES = 25
CLOCK_SKEW_MARGIN = timedelta(seconds=60)  # between the leaders of the command and event streams
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Command:
    """A parsed command and what its stream said about it."""

    raw: RawCommand
    seq: int  # its sequence in CC_COMMANDS: names the command in results and causation
    redelivered: bool
    stored_at: datetime  # when CC_COMMANDS stored it
    traceparent: str | None = None  # W3C trace context: its events carry the next hop of it

    @property
    def causation(self) -> str:
        return f"command:{self.seq}"


class CommandProcessor:
    def __init__(self, repository: AggregateRepository, component: Component) -> None:
        self._repository = repository
        self._component = component
        self.name = repository.name
        self.stream = repository.stream
        self._log = log.bind(aggregate=self.name)

    async def process(self, command: Command) -> CommandResult:
        async with self._repository.hold(command.raw.key):
            return await self._process(command)

    async def _process(self, command: Command) -> CommandResult:
        raw, key, repository = command.raw, command.raw.key, self._repository
        for _attempt in range(MAX_CONFLICT_RETRIES):
            current = await repository.current(key)
            if command.redelivered:
                done = await repository.caused_by(key, command.causation, command.stored_at - CLOCK_SKEW_MARGIN)
                if done:
                    await repository.save_if_behind(key, current)
                    return self._accepted(raw, done)
            try:
                decision = await self._component.decide(self.name, raw.command_type, key, current.value,
                                                        json.dumps(raw.data))
            except RejectedByComponent as exc:
                await repository.save_if_behind(key, current)
                return self._rejected(raw, str(exc))
            if not decision.events:
                return self._accepted(raw, [])
            messages = self._messages(key, decision.events, command.causation,
                                      child_of(command.traceparent) if command.traceparent else None)
            stored = [stored_form(message) for message in messages]
            value = await self._fold(decision, stored, current.value)
            try:
                seqs = await repository.append(key, current, messages)
            except AppendConflict:
                APPEND_CONFLICTS.labels(self.name).inc()
                self._log.debug("append conflict; deciding again", key=key, command_seq=command.seq)
                continue  # someone appended first: decide again on the newer state
            except AlreadyAppended:
                return await self._answer_duplicate(command)
            except EventTooLarge as exc:
                raise ComponentFailed(f"component returned an event too large to store: {exc}") from None
            fail_point("aggregate.after_append")
            await repository.save(key, current, value, seqs[-1])
            fail_point("aggregate.after_state")
            return self._accepted(raw, stored)
        raise ComponentFailed(f"gave up after {MAX_CONFLICT_RETRIES} concurrent-append conflicts")

    def _messages(self, key: str, events: list[Event], causation: str,
                  traceparent: str | None) -> list[EventMessage]:
        """The component's events as stored messages, or ComponentFailed if any is unusable."""
        messages = []
        for index, event in enumerate(events):
            if event.stream and event.stream != self.stream:
                raise ComponentFailed(
                    f"aggregate {self.name!r} may only append to its stream {self.stream!r}, not {event.stream!r}")
            try:
                cloud = to_cloud_event(event, self.stream, key)
                messages.append(to_message(cloud, key, causation, f"{causation}:{index}", traceparent))
            except BadMessage as exc:
                raise ComponentFailed(f"component returned a malformed event: {exc}") from None
        return messages

    async def _fold(self, decision: Decision, stored: list[LoggedEvent], value: str | None) -> str | None:
        """The state after the events, folded from exactly what a replay of the log will fold."""
        replayed = [to_component(event) for event in stored]
        if decision.folded and replayed == decision.events:
            return decision.state  # the runtime folded these very events already
        for event in replayed:
            value = await self._component.apply_event(event, value)
        return value

    async def _answer_duplicate(self, command: Command) -> CommandResult:
        """The log already holds this command's message ids: its events are there, from an earlier
        delivery the causation lookup did not see (clock skew beyond the margin)."""
        key = command.raw.key
        done = await self._repository.caused_by(key, command.causation, EPOCH)
        if not done:
            raise ComponentFailed(f"the event log already holds message ids of {command.causation} "
                                  f"but no event caused by it")
        await self._repository.save_if_behind(key, await self._repository.current(key))
        return self._accepted(command.raw, done)

    def _accepted(self, raw: RawCommand, events: list[LoggedEvent]) -> CommandResult:
        return CommandResult(status="accepted", aggregate=self.name, command_type=raw.command_type, key=raw.key,
                             events=[event.event_type for event in events])

    def _rejected(self, raw: RawCommand, error: str) -> CommandResult:
        return CommandResult(status="rejected", aggregate=self.name, command_type=raw.command_type, key=raw.key,
                             error=error)
