"""Link values (ROLE, INTEREST, NAME, KEY, ...) parsed once into a typed declaration.

Keys are case-insensitive and trimmed; event and command types are normalised to snake_case;
every malformed value is refused with an error that names the value and what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
from enum import Enum
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .naming import InvalidName, check_token, snake_case

DEFAULT_BATCH = 200
DEFAULT_CALL_TIMEOUT_MS = 10_000
DEFAULT_MEMORY_MB = 256
DEFAULT_MAX_DELIVERIES = 5
# The time a dead daemon's fetched messages stay with it before the server redelivers them.
# Live work is never redelivered for being slow: every fetched message gets an in-progress ack
# each third of this. Other ways to take back a dead daemon's messages early need to know it is
# dead (a -NAK must name the delivery; resetting the consumer loses every live delivery too).
DEFAULT_ACK_WAIT_MS = 5_000


class LinkError(ValueError):
    """A link definition that cannot be used."""


class Role(str, Enum):
    AGGREGATE = "aggregate"
    PROJECTOR = "projector"
    PROCESS_MANAGER = "process_manager"
    NOTIFIER = "notifier"


class ProcessLifetime(BaseModel):
    """Which events start, advance and stop one process of a process manager."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    start: str
    advance: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()

    def event_types(self) -> tuple[str, ...]:
        return (self.start, *self.advance, *self.stop)


class Interest(BaseModel):
    """One component's place in the pipeline, as declared by its link."""

    model_config = ConfigDict(frozen=True)
    role: Role
    name: str
    # aggregate: its stream name; projector/notifier: event types; process manager: lifetime
    stream: str | None = None
    event_types: tuple[str, ...] = ()
    lifetime: ProcessLifetime | None = None
    key_field: str | None = None
    max_messages_per_batch: int = Field(default=DEFAULT_BATCH, ge=1)
    call_timeout_ms: int = Field(default=DEFAULT_CALL_TIMEOUT_MS, ge=1)
    max_memory_mb: int = Field(default=DEFAULT_MEMORY_MB, ge=16)
    max_deliveries: int = Field(default=DEFAULT_MAX_DELIVERIES, ge=1)
    ack_wait_ms: int = Field(default=DEFAULT_ACK_WAIT_MS, ge=1000)
    read_model_bucket: str | None = None

    @property
    def consumer_name(self) -> str:
        prefix = {
            Role.AGGREGATE: "AGG_EVT",
            Role.PROJECTOR: "PROJ",
            Role.PROCESS_MANAGER: "PM",
            Role.NOTIFIER: "NOTIFIER",
        }[self.role]
        return f"{prefix}_{self.name}"

    @property
    def interested_event_types(self) -> tuple[str, ...]:
        if self.lifetime is not None:
            return self.lifetime.event_types()
        return self.event_types


def _normalise_keys(values: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise LinkError(f"link value {key!r} must be a string, got {type(value).__name__}")
        out[key.strip().upper()] = value.strip()
    return out


def _decode_config_b64(encoded: str) -> dict[str, str]:
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        decoded = json.loads(base64.urlsafe_b64decode(padded))
    except (binascii.Error, ValueError) as exc:
        raise LinkError(f"CONFIG_B64 is not URL-safe base64 of a JSON object: {exc}") from exc
    if not isinstance(decoded, dict):
        raise LinkError("CONFIG_B64 must decode to a JSON object")
    renamed = {"KEY" if k.lower() == "key_field" else k: v for k, v in decoded.items()}
    return _normalise_keys({k: _as_text(v) for k, v in renamed.items()})


def _as_text(value: object) -> str:
    """A list of event types means the comma-separated form; a mapping, its JSON."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    return value if isinstance(value, str) else json.dumps(value)


def _event_type(raw: str, where: str) -> str:
    name = snake_case(raw)
    try:
        return check_token(name, f"event type in {where}")
    except InvalidName as exc:
        raise LinkError(str(exc)) from exc


def _parse_lifetime(raw: str) -> ProcessLifetime:
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LinkError(f"process manager INTEREST is not valid JSON ({exc.msg}): {raw!r}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("start"), str):
        raise LinkError(
            'process manager INTEREST must be {"start": "evt", "advance": [...], "stop": [...]}'
        )
    for field in ("advance", "stop"):
        items = doc.get(field, [])
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise LinkError(f"process manager INTEREST field {field!r} must be a list of strings")
    unknown = set(doc) - {"start", "advance", "stop"}
    if unknown:
        raise LinkError(f"process manager INTEREST has unknown fields: {sorted(unknown)}")
    return ProcessLifetime(
        start=_event_type(doc["start"], "INTEREST.start"),
        advance=tuple(_event_type(e, "INTEREST.advance") for e in doc.get("advance", [])),
        stop=tuple(_event_type(e, "INTEREST.stop") for e in doc.get("stop", [])),
    )


def _positive_int(values: dict[str, str], key: str, default: int, strict: bool) -> int:
    raw = values.get(key)
    if raw is None or raw == "":
        return default
    try:
        number = int(raw)
    except ValueError:
        number = 0
    if number > 0:
        return number
    if strict:
        raise LinkError(f"{key} must be a positive integer, got {raw!r}")
    return default  # the original contract: an unparsable batch size falls back to the default


def parse_interest(values: Mapping[str, str]) -> Interest:
    """Turn one link's values into an ``Interest``, or raise ``LinkError`` saying why not."""
    normalised = _normalise_keys(values)
    if "CONFIG_B64" in normalised:
        normalised = {**_decode_config_b64(normalised.pop("CONFIG_B64")), **normalised}
    missing = [k for k in ("ROLE", "NAME", "INTEREST") if not normalised.get(k)]
    if missing:
        raise LinkError(f"link is missing required value(s): {', '.join(missing)}")
    try:
        role = Role(snake_case(normalised["ROLE"]))
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise LinkError(f"unknown ROLE {normalised['ROLE']!r}: expected one of {roles}") from None
    try:
        name = check_token(normalised["NAME"], "NAME")
    except InvalidName as exc:
        raise LinkError(str(exc)) from exc
    interest = normalised["INTEREST"]
    fields: dict[str, object] = {}
    if role is Role.AGGREGATE:
        try:
            fields["stream"] = check_token(interest, "aggregate INTEREST (stream name)")
        except InvalidName as exc:
            raise LinkError(str(exc)) from exc
    elif role is Role.PROCESS_MANAGER:
        fields["lifetime"] = _parse_lifetime(interest)
    else:
        types = [t for t in (p.strip() for p in interest.split(",")) if t]
        if not types:
            raise LinkError(f"{role.value} INTEREST must list at least one event type")
        fields["event_types"] = tuple(_event_type(t, "INTEREST") for t in types)
    key_field = normalised.get("KEY") or None
    if role is Role.PROCESS_MANAGER and key_field is None:
        raise LinkError("process manager link needs KEY: the event field that holds the process key")
    bucket = normalised.get("READ_MODEL_BUCKET") or None
    try:
        return Interest(
            role=role,
            name=name,
            key_field=key_field,
            max_messages_per_batch=_positive_int(normalised, "MAX_MESSAGES_PER_BATCH", DEFAULT_BATCH, False),
            call_timeout_ms=_positive_int(normalised, "CALL_TIMEOUT_MS", DEFAULT_CALL_TIMEOUT_MS, True),
            max_memory_mb=_positive_int(normalised, "MAX_MEMORY_MB", DEFAULT_MEMORY_MB, True),
            max_deliveries=_positive_int(normalised, "MAX_DELIVERIES", DEFAULT_MAX_DELIVERIES, True),
            ack_wait_ms=_positive_int(normalised, "ACK_WAIT_MS", DEFAULT_ACK_WAIT_MS, True),
            read_model_bucket=check_token(bucket, "READ_MODEL_BUCKET") if bucket else None,
            **fields,
        )
    except (ValidationError, InvalidName) as exc:
        raise LinkError(f"invalid link values: {exc}") from exc
