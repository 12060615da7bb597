"""W3C trace context: one business transaction followed across commands, events and components.

A command's ``traceparent`` header (made if none came in) is carried onto its events, its outcome
and the commands process managers send because of those events: each hop keeps the trace id and
gets a span id of its own.
"""

from __future__ import annotations

import random
import re

TRACEPARENT = "traceparent"
_FORMAT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# Trace and span ids need to be unique, not secret: the process's PRNG (seeded from the OS at start)
# makes them without a system call per id, which under load was 4 % of the event loop.
_random = random.Random()


def is_valid(value: str | None) -> bool:
    """A version-00 traceparent with a non-zero trace id and span id."""
    match = _FORMAT.fullmatch(value or "")
    return bool(match) and match.group(1) != _ZERO_TRACE and match.group(2) != _ZERO_SPAN


def _hex_id(bits: int) -> str:
    """A random non-zero id of ``bits`` bits in lower-case hex (the W3C format forbids zero)."""
    return f"{_random.getrandbits(bits) or 1:0{bits // 4}x}"


def new_traceparent() -> str:
    return f"00-{_hex_id(128)}-{_hex_id(64)}-01"


def received(value: str | None) -> str:
    """The traceparent that came in, or a new one where none (or a malformed one) did."""
    return value if value is not None and is_valid(value) else new_traceparent()


def child_of(parent: str | None) -> str:
    """The next hop of ``parent``'s trace: same trace id and flags, a new span id."""
    if parent is None or not is_valid(parent):
        return new_traceparent()
    _version, trace_id, _span, flags = parent.split("-")
    return f"00-{trace_id}-{_hex_id(64)}-{flags}"


def trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]
