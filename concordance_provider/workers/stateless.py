"""Projectors and notifiers: stateless handlers with a read model and, for notifiers, a voice.

Read-model writes and the handler's checkpoint are written in one atomic batch after the call
succeeds, so an event is applied to the read model exactly once. Events a notifier publishes
carry a message id derived from the event that caused them. Failure means redelivery.
"""

from __future__ import annotations

import asyncio

import structlog
from nats.aio.msg import Msg

from ..links import Interest, Role
from ..naming import (
    EVENTS_STREAM,
    InvalidName,
    check_token,
    event_type_filter,
    snake_case,
)
from ..runtime import Component, Event, HandlerEffects, RejectedByComponent
from ..store.events import EventLog, LoggedEvent
from ..store.readmodel import ReadModel
from ..wire import BadMessage, new_event
from .base import ConsumerSpec, Settle, settle, to_component_event

log = structlog.get_logger(__name__)

READ_TIMEOUT_SECONDS = 5.0


def read_model_bucket(interest: Interest) -> str:
    return interest.read_model_bucket or f"CC_RM_{interest.name}"


class StatelessWorker:
    def __init__(self, interest: Interest, component: Component, read_model: ReadModel,
                 events: EventLog, aggregate_streams: frozenset[str]) -> None:
        self.interest = interest
        self._component = component
        self._read_model = read_model
        self._events = events
        self._aggregate_streams = aggregate_streams
        self._logger = log.bind(component=component.name, handler=interest.name, role=interest.role.value)

    def consumer(self) -> ConsumerSpec:
        filters = tuple(event_type_filter(t) for t in self.interest.event_types)
        return ConsumerSpec(EVENTS_STREAM, self.interest.consumer_name, filters,
                            self.interest.max_messages_per_batch, max_ack_pending=1)

    async def dispatch(self, batch: list[Msg]) -> None:
        for msg in batch:
            await settle(msg, self.on_event, self._logger)

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

    async def on_event(self, msg: Msg) -> Settle:
        event = LoggedEvent.from_delivery(msg)
        logger = self._logger.bind(event_seq=event.seq, event_type=event.event_type, key=event.key)
        applied, revision = await self._read_model.checkpoint()
        if applied >= event.seq:
            return Settle.ACK
        loop = asyncio.get_running_loop()

        def read(key: str) -> str | None:
            return asyncio.run_coroutine_threadsafe(self._read_model.get(key), loop).result(READ_TIMEOUT_SECONDS)

        effects = HandlerEffects(read=read, check_publish=self._check_publish)
        try:
            await self._component.apply_stateless_event(to_component_event(event), effects)
        except RejectedByComponent as exc:
            logger.warning("handler failed; event will be redelivered", error=str(exc))
            return Settle.RETRY
        for index, (key, out) in enumerate(effects.published):
            try:
                cloud = new_event(snake_case(out.event_type), out.stream, key, out.payload)
            except BadMessage as exc:
                logger.error("handler published a malformed event; event will be redelivered", error=str(exc))
                return Settle.RETRY
            msg_id = f"{self.interest.consumer_name}:{event.seq}:{index}"
            await self._events.publish_one(cloud, key, msg_id, causation=f"event:{event.seq}")
        await self._read_model.apply(effects.puts, event.seq, revision)
        logger.debug("event handled", writes=len(effects.puts), published=len(effects.published))
        return Settle.ACK
