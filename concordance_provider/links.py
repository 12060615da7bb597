"""Link values (ROLE, INTEREST, NAME, KEY, ...) parsed once into a typed declaration.

Keys are case-insensitive and trimmed; event and command types are normalised to snake_case;
every malformed value is refused with an error that names the value and what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from enum import Enum
from typing import Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

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


@dataclass(frozen=True)
class Bound:
    """The values a numeric link setting may take, and its default."""

    low: int
    high: int
    default: int
    unit: str = ""

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.low} to {self.high}{unit}"


# Why each bound (README, "Link values"):
# - a batch is held in memory while it is worked through, and a projector commits at most 1000
#   messages at once;
# - a call gets at least 100 ms, so a loaded machine or a lattice round trip does not fail every
#   call, and at most 10 minutes, while its message is held with in-progress acks;
# - a Python component needs more than 16 MiB to start; a 32-bit wasm memory ends at 4 GiB;
# - 100 deliveries with the backoff capped at 60 s already retry for over an hour and a half;
# - in-progress acks go out each third of the ack wait for every held message: under a second, a
#   busy daemon misses them and live work is redelivered; over 5 minutes, a dead daemon's
#   messages wait that long for another daemon.
LINK_BOUNDS: dict[str, Bound] = {
    "MAX_MESSAGES_PER_BATCH": Bound(1, 1000, DEFAULT_BATCH, "messages"),
    "CALL_TIMEOUT_MS": Bound(100, 600_000, DEFAULT_CALL_TIMEOUT_MS, "ms"),
    "MAX_MEMORY_MB": Bound(16, 4096, DEFAULT_MEMORY_MB, "MiB"),
    "MAX_DELIVERIES": Bound(1, 100, DEFAULT_MAX_DELIVERIES, "deliveries"),
    "ACK_WAIT_MS": Bound(1000, 300_000, DEFAULT_ACK_WAIT_MS, "ms"),
}


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
    max_messages_per_batch: int = DEFAULT_BATCH
    call_timeout_ms: int = DEFAULT_CALL_TIMEOUT_MS
    max_memory_mb: int = DEFAULT_MEMORY_MB
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    ack_wait_ms: int = DEFAULT_ACK_WAIT_MS
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


def bounded_setting(key: str, raw: str | None) -> int:
    """One numeric link setting (``LINK_BOUNDS``): its default when absent, else a whole number
    within its bound, or LinkError naming the value and the range."""
    bound = LINK_BOUNDS[key]
    if raw is None or raw.strip() == "":
        return bound.default
    try:
        number = int(raw)
    except ValueError:
        number = 0
    if number <= 0:
        if key == "MAX_MESSAGES_PER_BATCH":
            return bound.default  # the original contract: an unparsable batch size falls back to the default
        raise LinkError(f"{key} must be a positive integer, got {raw!r}")
    if not bound.low <= number <= bound.high:
        raise LinkError(f"{key} {raw!r} is out of range: it must be {bound.describe()}")
    return number


def link_settings(values: Mapping[str, str]) -> dict[str, int]:
    """Every numeric setting of ``values`` (keys case-insensitive), checked as ``parse_interest``
    checks it; for values that apply to every link, as the provider's ``config.update`` sends."""
    normalised = _normalise_keys(values)
    return {key: bounded_setting(key, normalised.get(key)) for key in LINK_BOUNDS if key in normalised}


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
            **{key.lower(): bounded_setting(key, normalised.get(key)) for key in LINK_BOUNDS},
            read_model_bucket=check_token(bucket, "READ_MODEL_BUCKET") if bucket else None,
            **fields,
        )
    except (ValidationError, InvalidName) as exc:
        raise LinkError(f"invalid link values: {exc}") from exc
