"""Names, subjects and keys: the pure rules of the wire contract, testable without a server.

Event subjects carry the aggregate stream and key after the event type,
``cc.events.{event_type}.{stream}.{key}``, so that one aggregate instance's events can be read and
guarded with the wildcard ``cc.events.*.{stream}.{key}`` while every event type stays
subscribable with one subject, ``cc.events.{event_type}.>``.
"""

from __future__ import annotations

import re

COMMAND_PREFIX = "cc.commands"
EVENT_PREFIX = "cc.events"
COMMANDS_STREAM = "CC_COMMANDS"
EVENTS_STREAM = "CC_EVENTS"
STATE_BUCKET = "CC_STATE"
RESULTS_BUCKET = "CC_RESULTS"
DEADLETTER_STREAM = "CC_DEADLETTER"
DEADLETTER_PREFIX = "cc.deadletter"

# One NATS subject token that is also valid inside a KV key: no dots, wildcards, spaces or
# control characters, so a client can never address another aggregate's subject or state.
_TOKEN = re.compile(r"^[A-Za-z0-9_\-=]+$")
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_NON_WORD = re.compile(r"[\s\-]+")


class InvalidName(ValueError):
    """A name or key that cannot be used as a subject token or KV key."""


def snake_case(name: str) -> str:
    """`DepositFunds`, `deposit-funds` and `deposit_funds` all become `deposit_funds`."""
    spaced = _CAMEL_BOUNDARY.sub("_", name.strip())
    return _NON_WORD.sub("_", spaced).lower()


def check_token(value: str, what: str) -> str:
    """Return ``value`` if it is one safe subject token, else raise ``InvalidName``."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value) or len(value) > 128:
        raise InvalidName(
            f"{what} {value!r} is not allowed: use 1-128 characters from A-Z a-z 0-9 _ - ="
        )
    return value


def command_subject(aggregate: str, key: str | None = None) -> str:
    """``cc.commands.{aggregate}`` (the key in the body), or ``cc.commands.{aggregate}.{key}``: a
    subject NATS permissions can grant one key at a time."""
    return f"{COMMAND_PREFIX}.{aggregate}" if key is None else f"{COMMAND_PREFIX}.{aggregate}.{key}"


def command_filters(aggregate: str) -> tuple[str, str]:
    """Both subjects an aggregate's commands come on: without and with the key."""
    return f"{COMMAND_PREFIX}.{aggregate}", f"{COMMAND_PREFIX}.{aggregate}.*"


def parse_command_subject(subject: str) -> tuple[str, str | None]:
    """``cc.commands.{aggregate}[.{key}]`` -> (aggregate, the subject's key or None)."""
    parts = subject.split(".")
    if len(parts) not in (3, 4) or f"{parts[0]}.{parts[1]}" != COMMAND_PREFIX or not all(parts):
        raise InvalidName(f"not a command subject: {subject!r}")
    return parts[2], (parts[3] if len(parts) == 4 else None)


NO_KEY = "_"  # the key token of an outcome whose command has no usable key (or aggregate name)


def _usable(token: str | None) -> str:
    try:
        return check_token(token, "token") if token is not None else NO_KEY
    except InvalidName:
        return NO_KEY


def result_key(aggregate: str | None, key: str | None, seq: int) -> str:
    """The CC_RESULTS key of command ``seq``: ``{aggregate}.{key}.{seq}``, so a permission on
    ``$KV.CC_RESULTS.{aggregate}.{key}.>`` covers one instance's outcomes. A name or key that is
    missing or not one safe token is ``_``."""
    return f"{_usable(aggregate)}.{_usable(key)}.{int(seq)}"


def result_seq(result_key_: str) -> int:
    """The command sequence a CC_RESULTS key names (its last token)."""
    return int(result_key_.rsplit(".", 1)[-1])


def any_result_key(seq: int) -> str:
    """The pattern of command ``seq``'s CC_RESULTS key, whatever its aggregate and key."""
    return f"*.*.{int(seq)}"


def event_subject(event_type: str, stream: str, key: str) -> str:
    return f"{EVENT_PREFIX}.{event_type}.{stream}.{key}"


def event_type_filter(event_type: str) -> str:
    """Every event of one type, whatever its stream and key."""
    return f"{EVENT_PREFIX}.{event_type}.>"


def stream_filter(stream: str) -> str:
    """Every event of one aggregate stream."""
    return f"{EVENT_PREFIX}.*.{stream}.*"


def instance_filter(stream: str, key: str) -> str:
    """Every event of one aggregate instance."""
    return f"{EVENT_PREFIX}.*.{stream}.{key}"


RETRY_SUFFIX = "retry"
RETRY_FOR = "Concordance-Retry-For"  # header: the one consumer a retried event is meant for


def retry_subject(subject: str) -> str:
    """Where a dead event is sent again: its handlers' filters (``cc.events.{type}.>``) match it,
    the aggregate stream and instance filters (exactly five tokens) do not."""
    return f"{subject}.{RETRY_SUFFIX}"


def parse_event_subject(subject: str) -> tuple[str, str, str]:
    """``cc.events.{type}.{stream}.{key}`` (or its retry form) -> (type, stream, key)."""
    parts = subject.split(".")
    if len(parts) == 6 and parts[5] == RETRY_SUFFIX:
        parts = parts[:5]
    if len(parts) != 5 or f"{parts[0]}.{parts[1]}" != EVENT_PREFIX or not all(parts):
        raise InvalidName(f"not an event subject: {subject!r}")
    return parts[2], parts[3], parts[4]


def aggregate_state_key(name: str, key: str) -> str:
    return f"agg.{name}.{key}"


def process_state_key(name: str, key: str) -> str:
    return f"pm.{name}.{key}"
