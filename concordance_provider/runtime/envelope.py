"""The msgpack envelope of one call from the daemon to a component hosted by a wasmCloud host.

The daemon sends a ``CallRequest`` as a NATS request on the component's dispatch subject; the
component (``guest/concordance_guest.py``) answers with a ``CallReply``. A stateless handler
reads its read model and publishes events through ``CallbackRequest`` messages sent to the
request's ``callback`` subject while the call runs.
"""

from __future__ import annotations

from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

ENVELOPE_VERSION = 1

# "decide" is handle-command followed, in the same call, by apply-event of each event it returned.
CallName = Literal["handle-command", "decide", "apply-event", "handle-event", "apply-stateless-event", "ping"]


class EnvelopeError(ValueError):
    """Bytes that are not a valid envelope."""


class _Envelope(BaseModel):
    model_config = ConfigDict(frozen=True)

    def encode(self) -> bytes:
        return msgpack.packb(self.model_dump(mode="python"))

    @classmethod
    def decode(cls, data: bytes) -> Any:
        try:
            return cls.model_validate(msgpack.unpackb(data))
        except (ValueError, ValidationError, msgpack.UnpackException) as exc:
            raise EnvelopeError(f"not a {cls.__name__}: {exc}") from None


class CallRequest(_Envelope):
    v: int = ENVELOPE_VERSION
    call: CallName
    args: dict[str, Any]
    callback: str | None = None
    timeout_ms: int = 5000


class CallReply(_Envelope):
    """Exactly one of ``ok`` (with ``puts``), ``err`` (a decision) or ``fault`` (a bug) is meaningful."""

    v: int
    ok: Any = None
    err: str | None = None
    fault: str | None = None
    puts: dict[str, str | None] = {}


class CallbackRequest(_Envelope):
    op: Literal["get", "publish"]
    key: str
    event: dict[str, str] | None = None


class CallbackReply(_Envelope):
    value: str | None = None
    error: str | None = None


class _Answer(BaseModel):
    """What a component's ``ok`` holds; strict, so a wrongly typed answer is a component failure."""

    model_config = ConfigDict(strict=True, frozen=True)


class EventOut(_Answer):
    event_type: str
    stream: str
    payload: str


class StateOut(_Answer):
    state: str | None


class DecisionOut(_Answer):
    events: list[EventOut]
    folded: bool
    state: str | None


class CommandOut(_Answer):
    command_type: str
    aggregate_stream: str
    aggregate_key: str
    json_payload: str


class ProcessOut(_Answer):
    state: str | None
    commands: list[CommandOut]


# What each call's ``ok`` must be, built once: validators are not cheap to make per call.
EVENTS_OUT: TypeAdapter[list[EventOut]] = TypeAdapter(list[EventOut])
DECISION_OUT: TypeAdapter[DecisionOut] = TypeAdapter(DecisionOut)
STATE_OUT: TypeAdapter[StateOut] = TypeAdapter(StateOut)
PROCESS_OUT: TypeAdapter[ProcessOut] = TypeAdapter(ProcessOut)
