"""Messages that cross the wire: RawCommand in, CloudEvents out, command results back."""

from __future__ import annotations

import json
import random
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .naming import InvalidName, check_token, snake_case

EVENT_SOURCE = "concordance"
STREAM_EXTENSION = "x-concordance-stream"


class BadMessage(ValueError):
    """A message body that cannot be processed, with the reason a client can read."""


class RawCommand(BaseModel):
    """The JSON a client publishes on ``cc.commands.{aggregate}`` or ``cc.commands.{aggregate}.{key}``
    (then with that key): all three fields are required,
    as in the original contract (``data`` is the command's payload object, ``{}`` when empty)."""

    model_config = ConfigDict(extra="ignore")
    command_type: str
    key: str
    data: dict[str, Any]

    @field_validator("command_type")
    @classmethod
    def _snake(cls, value: str) -> str:
        return check_token(snake_case(value), "command_type")

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        return check_token(value, "key")


class KeyMismatch(BadMessage):
    """A command sent on ``cc.commands.{aggregate}.{key}`` whose body names another key."""

    def __init__(self, message: str, command: "RawCommand") -> None:
        super().__init__(message)
        self.command = command


def parse_command(body: bytes, subject_key: str | None = None) -> RawCommand:
    """The command in ``body``; ``subject_key`` is the key its subject names, if it names one,
    which the body's key must equal (``KeyMismatch`` otherwise): a permission granted on the
    subject then really limits the keys a client can act on."""
    try:
        command = RawCommand.model_validate_json(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
        )
        raise BadMessage(f"malformed command: {problems}") from None
    except InvalidName as exc:
        raise BadMessage(f"malformed command: {exc}") from None
    if subject_key is not None and command.key != subject_key:
        raise KeyMismatch(f"key mismatch: the subject names key {subject_key!r}, the command's body "
                          f"{command.key!r}; the command was not decided", command)
    return command


_random = random.Random()  # seeded from the OS at start


def random_uuid4() -> uuid.UUID:
    """A version-4 UUID from the process's PRNG: unique, without a system call per id as
    ``uuid.uuid4`` makes (event ids are names, not secrets)."""
    return uuid.UUID(int=_random.getrandbits(128), version=4)


class CloudEvent(BaseModel):
    """CloudEvents 1.0, structured JSON mode, as the original contract publishes them."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")
    specversion: Literal["1.0"] = "1.0"
    id: str = Field(default_factory=lambda: str(random_uuid4()))
    type: str
    source: str = EVENT_SOURCE
    subject: str | None = None
    time: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    datacontenttype: str = "application/json"
    data: Any = None
    stream: str = Field(alias=STREAM_EXTENSION)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


def new_event(event_type: str, stream: str, key: str, payload: str) -> CloudEvent:
    """Wrap a component's event; the payload must be a JSON document."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise BadMessage(f"event {event_type!r} payload is not JSON: {exc.msg}") from None
    return CloudEvent(type=event_type, subject=key, data=data, stream=stream)


def parse_event(body: bytes) -> CloudEvent:
    try:
        return CloudEvent.model_validate_json(body)
    except ValidationError as exc:
        raise BadMessage(f"malformed event: {exc.errors()[0]['msg']}") from None


class CommandResult(BaseModel):
    """What became of a command, stored in KV ``CC_RESULTS`` under ``{aggregate}.{key}.{seq}``
    (``seq``: its CC_COMMANDS sequence)."""

    status: Literal["accepted", "rejected"]
    aggregate: str
    command_type: str | None = None
    key: str | None = None
    events: list[str] = Field(default_factory=list)
    error: str | None = None
    traceparent: str | None = None  # the command's W3C trace context, carried onto its events
