"""Components hosted by a wasmCloud 2 host, called over NATS request/reply.

A component built with ``--target lattice`` serves ``wasmcloud:messaging`` on its dispatch
subject (a queue subscription on the host, so several hosts share the calls). A call that gets
no answer, because no host serves the subject or the host died mid-call, raises
``ComponentUnavailable``: an outage, so the message waits and is retried without being counted
against it. An ``err`` answer is a decision; a ``fault`` or an unreadable answer is a failure.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from ..links import Role
from .component import (
    ComponentFailed,
    Event,
    HandlerEffects,
    OutputCommand,
    ProcessManagerAck,
    RejectedByComponent,
)
from .envelope import CallbackReply, CallbackRequest, CallName, CallReply, CallRequest, EnvelopeError
from .stats import CallStats

log = structlog.get_logger(__name__)


class ComponentUnavailable(Exception):
    """Nobody answered on the component's dispatch subject: not the message's fault."""


def _event(event: Event) -> dict[str, str]:
    return {"event_type": event.event_type, "stream": event.stream, "payload": event.payload}


class LatticeComponent:
    """Implements the ``Component`` protocol by calling a remote component over NATS."""

    def __init__(self, name: str, nc: NATS, subject: str, role: Role, call_timeout_ms: int) -> None:
        self.name = name
        self.subject = subject
        self.role = role
        self.stats = CallStats()
        self._nc = nc
        self._timeout_ms = call_timeout_ms

    async def start(self) -> None:
        """Nothing to load: the host holds the component. Calls wait until it serves."""

    async def _call(self, call: CallName, args: dict[str, Any], effects: HandlerEffects | None = None) -> Any:
        started = time.perf_counter()
        error: Exception | None = None
        callback = await self._serve_callbacks(effects) if effects is not None else None
        try:
            request = CallRequest(call=call, args=args, timeout_ms=self._timeout_ms,
                                  callback=callback.subject if callback else None)
            return self._result(await self._request(request), effects)
        except (RejectedByComponent, ComponentFailed, ComponentUnavailable) as exc:
            error = exc
            raise
        finally:
            if callback is not None:
                await callback.unsubscribe()
            if not isinstance(error, RejectedByComponent):
                self.stats.record(started, error)

    async def _request(self, request: CallRequest) -> CallReply:
        try:
            msg = await self._nc.request(self.subject, request.encode(), timeout=self._timeout_ms / 1000)
        except NoRespondersError:
            raise ComponentUnavailable(f"no wasmCloud host serves {self.subject}") from None
        except (NatsTimeout, asyncio.TimeoutError):
            raise ComponentUnavailable(f"no answer on {self.subject} within {self._timeout_ms} ms") from None
        try:
            return CallReply.decode(msg.data)
        except EnvelopeError as exc:
            raise ComponentFailed(f"unreadable answer from {self.subject}: {exc}") from None

    @staticmethod
    def _result(reply: CallReply, effects: HandlerEffects | None) -> Any:
        if reply.fault is not None:
            raise ComponentFailed(reply.fault)
        if reply.err is not None:
            raise RejectedByComponent(reply.err)
        if effects is not None:
            effects.puts.update(reply.puts)
        return reply.ok

    async def _serve_callbacks(self, effects: HandlerEffects) -> Any:
        """A private inbox, for this call only, answering the handler's reads and publishes."""

        async def answer(msg: Msg) -> None:
            if not msg.reply:
                return
            try:
                reply = await asyncio.to_thread(self._callback, CallbackRequest.decode(msg.data), effects)
            except EnvelopeError as exc:
                reply = CallbackReply(error=str(exc))
            await self._nc.publish(msg.reply, reply.encode())

        return await self._nc.subscribe(self._nc.new_inbox(), cb=answer)

    @staticmethod
    def _callback(request: CallbackRequest, effects: HandlerEffects) -> CallbackReply:
        # In a worker thread: HandlerEffects.read blocks on the event loop, as it does in-process.
        if request.op == "get":
            return CallbackReply(value=effects.get(request.key))
        raw = request.event or {}
        try:
            event = Event(raw["event_type"], raw["stream"], raw["payload"])
        except KeyError as exc:
            return CallbackReply(error=f"event lacks {exc}")
        refusal = effects.check_publish(request.key, event)
        if refusal is None:
            effects.published.append((request.key, event))
        return CallbackReply(error=refusal)

    async def handle_command(self, aggregate: str, command_type: str, key: str, state: str | None,
                             payload: str) -> list[Event]:
        raw = await self._call("handle-command", {"aggregate": aggregate, "command_type": command_type,
                                                  "key": key, "state": state, "payload": payload})
        try:
            return [Event(e["event_type"], e["stream"], e["payload"]) for e in raw]
        except (TypeError, KeyError) as exc:
            raise ComponentFailed(f"handle-command answered something that is not a list of events: {exc}") from None

    async def apply_event(self, event: Event, state: str | None) -> str | None:
        raw = await self._call("apply-event", {"event": _event(event), "state": state})
        if not isinstance(raw, dict) or not isinstance(raw.get("state"), (str, type(None))):
            raise ComponentFailed(f"apply-event answered {json.dumps(raw, default=str)[:200]}")
        return raw["state"]

    async def handle_event(self, event: Event, state: str | None) -> ProcessManagerAck:
        raw = await self._call("handle-event", {"event": _event(event), "state": state})
        try:
            commands = [OutputCommand(c["command_type"], c["aggregate_stream"], c["aggregate_key"], c["json_payload"])
                        for c in raw["commands"]]
            return ProcessManagerAck(raw["state"], commands)
        except (TypeError, KeyError) as exc:
            raise ComponentFailed(f"handle-event answered something that is not an ack: {exc}") from None

    async def apply_stateless_event(self, event: Event, effects: HandlerEffects) -> None:
        await self._call("apply-stateless-event", {"event": _event(event)}, effects)

    async def close(self) -> None:
        """The host keeps the component; nothing here to release."""
