"""Process managers: events of a process become commands for aggregates.

Commands are published before state is saved, each with a message id derived from the event
that caused it, so a crash in between re-sends them and JetStream drops the duplicates. The
saved state records the event it reflects, so a redelivered event is recognised and skipped.
Events are handled one at a time in log order, across all daemons.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from ..failpoints import fail_point
from ..links import Interest
from ..naming import (
    EVENTS_STREAM,
    InvalidName,
    check_token,
    command_subject,
    event_type_filter,
    process_state_key,
    snake_case,
)
from ..runtime import Component, ComponentFailed, OutputCommand, RejectedByComponent
from ..signing import Signer
from ..store.deadletters import DeadLetters
from ..store.jetstream import PayloadTooLarge, publish
from ..store.state import StateStore
from ..tracing import TRACEPARENT, child_of, trace_id
from .base import (
    ConsumerSpec,
    Poison,
    Retry,
    Settler,
    consumer_for,
    delivered_event,
    dispatch_in_order,
    meant_for_another,
    to_component_event,
)

log = structlog.get_logger(__name__)


class ProcessManagerWorker:
    def __init__(self, interest: Interest, component: Component, states: StateStore, nc: NATS,
                 dead_letters: DeadLetters, signer: Signer | None = None) -> None:
        assert interest.lifetime is not None and interest.key_field is not None
        self.interest = interest
        self._lifetime = interest.lifetime
        self._component = component
        self._states = states
        self._nc = nc
        self._signer = signer  # with a key, forged events are dead-lettered, never handled
        self._logger = log.bind(component=component.name, process_manager=interest.name)
        self._settle = Settler(interest.consumer_name, component.name, interest.max_deliveries,
                               dead_letters, self._logger)

    def consumer(self) -> ConsumerSpec:
        filters = tuple(event_type_filter(t) for t in self._lifetime.event_types())
        return consumer_for(self.interest, EVENTS_STREAM, self.interest.consumer_name, filters, max_ack_pending=1)

    async def dispatch(self, batch: list[Msg], stopping: asyncio.Event) -> None:
        await dispatch_in_order(batch, lambda m: self._settle(m, self.on_event), stopping)

    async def on_event(self, msg: Msg) -> None:
        if meant_for_another(msg, self.interest.consumer_name):
            return
        event = delivered_event(msg, self._signer)
        # the commands this event causes continue its trace (a new one where it carried none)
        traceparent = child_of((msg.headers or {}).get(TRACEPARENT))
        logger = self._logger.bind(event_seq=event.seq, event_type=event.event_type, trace_id=trace_id(traceparent))
        data = event.cloud_event.data
        process_key = data.get(self.interest.key_field) if isinstance(data, dict) else None
        try:
            check_token(str(process_key) if process_key is not None else "", "process key")
        except InvalidName as exc:
            raise Poison(f"event has no usable process key in field {self.interest.key_field!r}: {exc}") from None
        state_key = process_state_key(self.interest.name, str(process_key))
        logger = logger.bind(key=process_key)
        stored = await self._states.load(state_key)
        if stored.event_seq >= event.seq:
            return  # already handled before a redelivery
        starting = event.event_type == self._lifetime.start
        if not starting and stored.value is None:
            logger.info("event for a process that is not running; skipped")
            return
        try:
            ack = await self._component.handle_event(to_component_event(event), None if starting else stored.value)
        except (RejectedByComponent, ComponentFailed) as exc:
            raise Retry(f"process manager failed on {event.event_type}: {exc}") from None
        outgoing = [_command_body(c) for c in ack.commands]  # all valid before any is sent
        try:
            for index, (aggregate, body) in enumerate(outgoing):
                await self._send(aggregate, body, f"pm:{self.interest.name}:{event.seq}:{index}", traceparent, logger)
        except PayloadTooLarge as exc:
            raise Retry(f"process manager returned a command too large to send: {exc}") from None
        fail_point("process_manager.after_publish")
        await self._states.save(state_key, ack.state, event.seq, stored.revision)
        logger.info("process advanced", commands=len(ack.commands), ended=ack.state is None)

    async def _send(self, aggregate: str, body: dict, msg_id: str, traceparent: str, logger: Any) -> None:
        seq = await publish(self._nc, command_subject(aggregate), json.dumps(body).encode(),
                            {"Nats-Msg-Id": msg_id, TRACEPARENT: traceparent})
        logger.debug("command sent", aggregate=aggregate, command_seq=seq)


def _command_body(command: OutputCommand) -> tuple[str, dict[str, Any]]:
    """The aggregate and RawCommand of an output command, or Retry saying what is wrong."""
    try:
        aggregate = check_token(command.aggregate_stream, "aggregate_stream")
        key = check_token(command.aggregate_key, "aggregate_key")
        command_type = check_token(snake_case(command.command_type), "command_type")
        data = json.loads(command.json_payload)
    except (InvalidName, ValueError) as exc:
        raise Retry(f"process manager returned a malformed command: {exc}") from None
    return aggregate, {"command_type": command_type, "key": key, "data": data}

