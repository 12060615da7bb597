"""Components hosted by a wasmCloud 2 host, called over NATS request/reply.

A component built with ``--target lattice`` serves ``wasmcloud:messaging`` on its dispatch
subject (a queue subscription on the host, so several hosts share the calls). How a call ends:

- ``ok``: the answer, checked strictly; a wrongly typed answer is ``ComponentFailed``;
- ``err``: a decision (``RejectedByComponent``); ``fault`` or an unreadable answer: ``ComponentFailed``;
- no responders: ``ComponentUnavailable``, an outage: the message waits and is not counted;
- no answer in time: the host gives no reply when a call traps, runs out of memory or runs too
  long, so the subject is pinged. If the component answers the ping, the call failed
  (``ComponentFailed``); if not, its host is gone (``ComponentUnavailable``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeVar

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from pydantic import TypeAdapter, ValidationError

from ..links import Role
from .call_caps import CallBudget
from .component import (
    ComponentFailed,
    ComponentUnavailable,
    Decision,
    Event,
    HandlerEffects,
    OutputCommand,
    ProcessManagerAck,
    RejectedByComponent,
)
from .envelope import (
    DECISION_OUT,
    EVENTS_OUT,
    PROCESS_OUT,
    STATE_OUT,
    CallbackReply,
    CallbackRequest,
    CallName,
    CallReply,
    CallRequest,
    EnvelopeError,
)
from .stats import CallStats

log = structlog.get_logger(__name__)

PING_SECONDS = 2.0
Answer = TypeVar("Answer")


def _event(event: Event) -> dict[str, str]:
    return {"event_type": event.event_type, "stream": event.stream, "payload": event.payload}


class _Callbacks:
    """A private inbox, for one call only, answering the handler's reads and publishes."""

    def __init__(self, nc: NATS, effects: HandlerEffects) -> None:
        self._nc = nc
        self._effects = effects
        self._budget = CallBudget(effects)  # publishes are capped as they come; writes come with the answer
        self.failure: Exception | None = None  # what went wrong on the daemon's side, if anything
        self.subject = nc.new_inbox()

    async def __aenter__(self) -> "_Callbacks":
        self._sub = await self._nc.subscribe(self.subject, cb=self._answer)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()

    async def _answer(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            # In a worker thread: HandlerEffects.read blocks on the event loop, as it does in-process.
            reply = await asyncio.to_thread(self._serve, CallbackRequest.decode(msg.data))
        except EnvelopeError as exc:
            reply = CallbackReply(error=str(exc))
        except Exception as exc:  # noqa: BLE001 - the guest must hear back, and the call must fail
            self.failure = self.failure or exc  # the first one says what went wrong
            reply = CallbackReply(error=f"the daemon could not serve {type(exc).__name__}: {exc}")
        await self._nc.publish(msg.reply, reply.encode())

    def _serve(self, request: CallbackRequest) -> CallbackReply:
        if request.op == "get":
            return CallbackReply(value=self._effects.get(request.key))
        raw = request.event or {}
        try:
            event = Event(raw["event_type"], raw["stream"], raw["payload"])
        except KeyError as exc:
            return CallbackReply(error=f"event lacks {exc}")
        refusal = self._effects.check_publish(request.key, event)
        if refusal is None:
            self._budget.publish(request.key, event)  # OverCap: the component's failure
            self._effects.published.append((request.key, event))
        return CallbackReply(error=refusal)

    def raise_failure(self) -> None:
        """A bad argument from the component is its failure; anything else (KV away) an outage."""
        if isinstance(self.failure, ValueError):
            raise ComponentFailed(f"the component passed a bad argument: {self.failure}")
        if self.failure is not None:
            raise ComponentUnavailable(f"could not serve the component's request: {self.failure}")


class LatticeComponent:
    """Implements the ``Component`` protocol by calling a remote component over NATS."""

    def __init__(self, name: str, nc: NATS, subject: str, role: Role, call_timeout_ms: int) -> None:
        self.name = name
        self.subject = subject
        self.role = role
        self.stats = CallStats(component=name)
        self._nc = nc
        self._timeout_ms = call_timeout_ms

    async def _call(self, call: CallName, args: dict[str, Any], effects: HandlerEffects | None = None) -> Any:
        started = time.perf_counter()
        error: Exception | None = None
        try:
            if effects is None:
                return self._result(await self._request(CallRequest(call=call, args=args,
                                                                    timeout_ms=self._timeout_ms)))
            async with _Callbacks(self._nc, effects) as callbacks:
                request = CallRequest(call=call, args=args, timeout_ms=self._timeout_ms, callback=callbacks.subject)
                reply = await self._request(request)
            callbacks.raise_failure()
            value = self._result(reply)
            effects.puts.update(reply.puts)
            return value
        except RejectedByComponent:
            raise  # an answer, not a failure
        except Exception as exc:
            error = exc
            raise
        finally:
            if call != "ping":
                self.stats.record(started, error, call)

    async def _request(self, request: CallRequest) -> CallReply:
        try:
            msg = await self._nc.request(self.subject, request.encode(), timeout=self._timeout_ms / 1000)
        except NoRespondersError:
            raise ComponentUnavailable(f"no wasmCloud host serves {self.subject}") from None
        except MaxPayloadError as exc:
            raise ComponentFailed(f"the call is too large to send: {exc}") from None
        except (NatsTimeout, asyncio.TimeoutError):
            if await self._answers_ping():
                raise ComponentFailed(f"{request.call} gave no answer within {self._timeout_ms} ms "
                                      f"(it trapped, ran out of memory or ran too long)") from None
            raise ComponentUnavailable(f"no answer on {self.subject} within {self._timeout_ms} ms") from None
        try:
            return CallReply.decode(msg.data)
        except EnvelopeError as exc:
            raise ComponentFailed(f"unreadable answer from {self.subject}: {exc}") from None

    async def _answers_ping(self) -> bool:
        try:
            msg = await self._nc.request(self.subject, CallRequest(call="ping", args={}).encode(), timeout=PING_SECONDS)
            return CallReply.decode(msg.data).fault is None
        except Exception:  # noqa: BLE001 - any failure means nobody is there to answer
            return False

    @staticmethod
    def _result(reply: CallReply) -> Any:
        if reply.fault is not None:
            raise ComponentFailed(reply.fault)
        if reply.err is not None:
            raise RejectedByComponent(reply.err)
        return reply.ok

    @staticmethod
    def _checked(kind: TypeAdapter[Answer], value: Any, call: str) -> Answer:
        try:
            return kind.validate_python(value)
        except ValidationError as exc:
            raise ComponentFailed(f"{call} answered something unusable: {exc.errors()[0]['msg']} "
                                  f"at {exc.errors()[0]['loc']}") from None

    async def handle_command(self, aggregate: str, command_type: str, key: str, state: str | None,
                             payload: str) -> list[Event]:
        raw = await self._call("handle-command", {"aggregate": aggregate, "command_type": command_type,
                                                  "key": key, "state": state, "payload": payload})
        return [Event(e.event_type, e.stream, e.payload) for e in self._checked(EVENTS_OUT, raw, "handle-command")]

    async def decide(self, aggregate: str, command_type: str, key: str, state: str | None,
                     payload: str) -> Decision:
        """One round trip for the decision and its fold, instead of one plus one per event."""
        raw = await self._call("decide", {"aggregate": aggregate, "command_type": command_type,
                                          "key": key, "state": state, "payload": payload})
        out = self._checked(DECISION_OUT, raw, "decide")
        return Decision([Event(e.event_type, e.stream, e.payload) for e in out.events], out.folded, out.state)

    async def apply_event(self, event: Event, state: str | None) -> str | None:
        try:
            raw = await self._call("apply-event", {"event": _event(event), "state": state})
        except RejectedByComponent as exc:
            raise ComponentFailed(f"component {self.name!r} refused to apply {event.event_type}: {exc}") from None
        return self._checked(STATE_OUT, raw, "apply-event").state

    async def handle_event(self, event: Event, state: str | None) -> ProcessManagerAck:
        raw = await self._call("handle-event", {"event": _event(event), "state": state})
        ack = self._checked(PROCESS_OUT, raw, "handle-event")
        return ProcessManagerAck(ack.state, [OutputCommand(c.command_type, c.aggregate_stream, c.aggregate_key,
                                                           c.json_payload) for c in ack.commands])

    async def apply_stateless_event(self, event: Event, effects: HandlerEffects) -> None:
        await self._call("apply-stateless-event", {"event": _event(event)}, effects)

    async def close(self) -> None:
        """The host keeps the component; nothing here to release."""
