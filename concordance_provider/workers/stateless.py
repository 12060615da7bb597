"""Projectors and notifiers: stateless handlers with a read model and, for notifiers, a voice.

A fetched batch is applied in log order as one unit (``checkpointed``): each event's read-model
writes are gathered, with reads seeing the writes of the events before it, and written with the
handler's checkpoint in one atomic batch, so an event is applied to the read model exactly once.
An event is handled in two steps: the component call (``call``), which the batch may start before
the calls before it are done, and the check and publishing of what it did (``finish``), in order.
Events a notifier publishes carry a message id derived from the event that caused them, so a
batch applied again after a crash publishes nothing twice. Failure means redelivery.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AbstractSet, Callable

import structlog
from nats.aio.msg import Msg

from ..engine.mapper import LoggedEvent
from ..links import Interest, Role
from ..naming import (
    EVENTS_STREAM,
    InvalidName,
    check_token,
    event_type_filter,
    snake_case,
)
from ..runtime import (
    Component,
    ComponentFailed,
    Event,
    HandlerEffects,
    RejectedByComponent,
)
from ..runtime.call_caps import OverCap, check_effects
from ..store.deadletters import DeadLetters
from ..store.events import EventLog
from ..store.filtered_log import FilteredLog
from ..store.jetstream import PayloadTooLarge, StoredMessage
from ..store.readmodel import MAX_KEYS_PER_GET, ReadModel
from ..tracing import TRACEPARENT, child_of
from ..wire import BadMessage, new_event
from .base import (
    ConsumerSpec,
    Retry,
    Settler,
    consumer_for,
    event_of,
    meant_for_another,
    to_component_event,
)
from .batch_plan import Delivery
from .checkpointed import CheckpointedBatch

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Called:
    """A component call made on one event, its effects not yet checked nor published."""

    event: LoggedEvent
    effects: HandlerEffects
    traceparent: str | None = None  # the handled event's trace context, continued by what it publishes


def read_model_bucket(interest: Interest) -> str:
    return interest.read_model_bucket or f"CC_RM_{interest.name}"


class StatelessWorker:
    def __init__(self, interest: Interest, component: Component, read_model: ReadModel,
                 events: EventLog, aggregate_streams: AbstractSet[str], dead_letters: DeadLetters) -> None:
        self.interest = interest
        self._component = component
        self._read_model = read_model
        self._events = events
        self._aggregate_streams = aggregate_streams
        self._logger = log.bind(component=component.name, handler=interest.name, role=interest.role.value)
        self._settle = Settler(interest.consumer_name, component.name, interest.max_deliveries,
                               dead_letters, self._logger)
        self._hot_keys: list[str] = []  # the read-model keys the last batch read
        self._last_settled: Delivery | None = None  # the event the last batch moved the checkpoint to

    def consumer(self) -> ConsumerSpec:
        return self.consumer_spec(self.interest)

    @staticmethod
    def consumer_spec(interest: Interest) -> ConsumerSpec:
        filters = tuple(event_type_filter(t) for t in interest.event_types)
        # a fetch brings a whole batch; the order across daemons is kept by the checkpoint
        return consumer_for(interest, EVENTS_STREAM, interest.consumer_name, filters,
                            max_ack_pending=interest.max_messages_per_batch)

    async def dispatch(self, batch: list[Msg], stopping: asyncio.Event) -> None:
        if not batch:
            return
        spec = self.consumer()
        events = FilteredLog(batch[0]._client, spec.durable, spec.filter_subjects)  # the batch's connection
        applying = CheckpointedBatch(batch, stopping, handler=self, read_model=self._read_model, log=events,
                                     settle=self._settle, logger=self._logger, prefetch=self._hot_keys,
                                     previous=self._last_settled)
        await applying.run()
        self._last_settled = applying.last_settled
        if applying.keys_read:
            self._hot_keys = sorted(applying.keys_read)[:MAX_KEYS_PER_GET]

    def _check_publish(self, key: str, event: Event) -> str | None:
        if self.interest.role is not Role.NOTIFIER:
            return f"a {self.interest.role.value} may not publish events"
        if event.stream in self._aggregate_streams:
            return f"stream {event.stream!r} belongs to an aggregate; send it a command instead"
        try:
            check_token(key, "event key")
            check_token(event.stream, "event stream")
            check_token(snake_case(event.event_type), "event type")
        except InvalidName as exc:
            return str(exc)
        return None

    async def call(self, seq: int, msg: Msg | StoredMessage, read: Callable[[str], str | None],
                   puts: dict[str, str | None]) -> Called | None:
        """Run the component on one event (delivered, or read from the log), its writes going to
        ``puts``; None for an event meant for another handler."""
        if meant_for_another(msg, self.interest.consumer_name):
            return None
        event = event_of(seq, msg, self._events.signer)  # Poison if not an event, or forged
        effects = HandlerEffects(read=read, check_publish=self._check_publish, puts=puts)
        try:
            await self._component.apply_stateless_event(to_component_event(event), effects)
            check_effects(effects)  # a remote component hands its writes over with its answer
        except (RejectedByComponent, ComponentFailed, OverCap) as exc:
            raise Retry(f"handler failed on {event.event_type}: {exc}") from None
        return Called(event, effects, child_of((msg.headers or {}).get(TRACEPARENT)))

    async def finish(self, called: Called | None) -> dict[str, str | None]:
        """An event's read-model writes, checked, once the events it reports are published."""
        if called is None:
            return {}
        event, effects = called.event, called.effects
        try:
            outgoing = [(key, new_event(snake_case(out.event_type), out.stream, key, out.payload))
                        for key, out in effects.published]
        except BadMessage as exc:
            raise Retry(f"handler published a malformed event: {exc}") from None
        refusal = self._read_model.refusal(effects.puts)
        if refusal is not None:
            raise Retry(refusal)
        try:
            for index, (key, cloud) in enumerate(outgoing):
                msg_id = f"{self.interest.consumer_name}:{event.seq}:{index}"
                await self._events.publish_one(cloud, key, msg_id, causation=f"event:{event.seq}",
                                               traceparent=called.traceparent)
        except PayloadTooLarge as exc:
            raise Retry(f"handler produced a message too large to store: {exc}") from None
        return effects.puts
