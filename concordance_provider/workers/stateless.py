"""Projectors and notifiers: stateless handlers with a read model and, for notifiers, a voice.

Read-model writes and the handler's checkpoint are written in one atomic batch after the call
succeeds, so an event is applied to the read model exactly once. Events a notifier publishes
carry a message id derived from the event that caused them. Failure means redelivery.
"""

from __future__ import annotations

import asyncio
from typing import AbstractSet

import structlog
from nats.aio.msg import Msg

from ..failpoints import fail_point
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
from ..store.deadletters import DeadLetters
from ..store.events import EventLog
from ..store.jetstream import PayloadTooLarge
from ..store.readmodel import ReadModel, is_valid_key
from ..wire import BadMessage, new_event
from .base import (
    ConsumerSpec,
    Retry,
    Settler,
    consumer_for,
    delivered_event,
    dispatch_in_order,
    meant_for_another,
    to_component_event,
)

log = structlog.get_logger(__name__)

READ_TIMEOUT_SECONDS = 5.0


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

    def consumer(self) -> ConsumerSpec:
        return self.consumer_spec(self.interest)

    @staticmethod
    def consumer_spec(interest: Interest) -> ConsumerSpec:
        filters = tuple(event_type_filter(t) for t in interest.event_types)
        return consumer_for(interest, EVENTS_STREAM, interest.consumer_name, filters, max_ack_pending=1)

    async def dispatch(self, batch: list[Msg], stopping: asyncio.Event) -> None:
        await dispatch_in_order(batch, lambda m: self._settle(m, self.on_event), stopping)

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

    async def on_event(self, msg: Msg) -> None:
        if meant_for_another(msg, self.interest.consumer_name):
            return
        event = delivered_event(msg)
        logger = self._logger.bind(event_seq=event.seq, event_type=event.event_type, key=event.key)
        applied, revision = await self._read_model.checkpoint()
        if applied >= event.seq:
            return
        loop = asyncio.get_running_loop()

        def read(key: str) -> str | None:
            return asyncio.run_coroutine_threadsafe(self._read_model.get(key), loop).result(READ_TIMEOUT_SECONDS)

        effects = HandlerEffects(read=read, check_publish=self._check_publish)
        try:
            await self._component.apply_stateless_event(to_component_event(event), effects)
        except (RejectedByComponent, ComponentFailed) as exc:
            raise Retry(f"handler failed on {event.event_type}: {exc}") from None
        try:
            outgoing = [(key, new_event(snake_case(out.event_type), out.stream, key, out.payload))
                        for key, out in effects.published]
        except BadMessage as exc:
            raise Retry(f"handler published a malformed event: {exc}") from None
        invalid = [k for k in effects.puts if not is_valid_key(k)]
        if invalid:
            raise Retry(f"handler wrote read-model keys that are not valid KV keys: {invalid}")
        try:
            for index, (key, cloud) in enumerate(outgoing):
                msg_id = f"{self.interest.consumer_name}:{event.seq}:{index}"
                await self._events.publish_one(cloud, key, msg_id, causation=f"event:{event.seq}")
            fail_point("read_model.before_commit")
            await self._read_model.apply(effects.puts, event.seq, revision)
        except PayloadTooLarge as exc:
            raise Retry(f"handler produced a message too large to store: {exc}") from None
        logger.debug("event handled", writes=len(effects.puts), published=len(effects.published))
