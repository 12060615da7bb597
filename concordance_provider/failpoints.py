"""Failpoints: named places in the engine where a test makes the daemon crash or a call fail.

Off unless the environment variable ``CONCORDANCE_FAILPOINTS`` arms some, as
``point=action[@hit]`` separated by ``;``, for example
``aggregate.after_append=crash@3;deadletter.before_store=error``:

- ``crash``: the process exits at once (code ``CRASH_EXIT_CODE``), with no cleanup, acks or
  flushes, as after ``kill -9``;
- ``error``: the call raises ``FailpointError``, as a failed NATS request would;
- ``@hit``: only the hit-th pass through the point fires (counted from 1); without it, every pass.

A disarmed point costs one truth test of an empty dict.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

ENV = "CONCORDANCE_FAILPOINTS"
CRASH_EXIT_CODE = 86

POINTS = {
    "aggregate.after_append": "a command's events are stored, its state not yet written",
    "aggregate.after_state": "a command's state is written, its outcome and ack not yet",
    "events.mid_batch": "the first event of a several-event append is sent, the rest not yet",
    "process_manager.after_publish": "a process manager's commands are sent, its state not yet saved",
    "deadletter.before_store": "a message is to be dead-lettered, its dead letter not yet stored",
    "deadletter.after_store": "a dead letter is stored, its message not yet terminated",
    "read_model.before_commit": "a projector's writes are computed, not yet stored with its checkpoint",
}


class FailpointError(RuntimeError):
    """Raised by an armed failpoint whose action is ``error``."""


@dataclass
class _Armed:
    action: str
    hit: int | None  # None: every pass
    passes: int = 0


_armed: dict[str, _Armed] = {}


def configure(spec: str | None) -> None:
    """Arm the failpoints ``spec`` names (replacing any armed before); ValueError if malformed."""
    armed: dict[str, _Armed] = {}
    for item in filter(None, (part.strip() for part in (spec or "").split(";"))):
        point, sep, rule = item.partition("=")
        action, _, hit = rule.partition("@")
        if not sep or point not in POINTS or action not in ("crash", "error"):
            raise ValueError(
                f"{ENV}: {item!r} is not point=crash|error[@hit]; points: {', '.join(sorted(POINTS))}")
        if hit and (not hit.isdigit() or int(hit) < 1):
            raise ValueError(f"{ENV}: {item!r}: the hit must be a positive whole number")
        armed[point] = _Armed(action, int(hit) if hit else None)
    _armed.clear()
    _armed.update(armed)


def fail_point(name: str) -> None:
    """Crash or fail here if ``name`` is armed; nothing otherwise."""
    if _armed:
        _trigger(name)


def is_armed(name: str) -> bool:
    """Whether ``name`` is armed, for a point that needs a setup step (a flush) to mean anything."""
    return name in _armed


def _trigger(name: str) -> None:
    armed = _armed.get(name)
    if armed is None:
        return
    armed.passes += 1
    if armed.hit is not None and armed.passes != armed.hit:
        return
    if armed.action == "error":
        raise FailpointError(f"failpoint {name} fired")
    sys.stderr.write(f'{{"event": "failpoint crash", "failpoint": "{name}", "pass": {armed.passes}}}\n')
    sys.stderr.flush()
    os._exit(CRASH_EXIT_CODE)


try:
    configure(os.environ.get(ENV))
except ValueError as exc:  # a typo must not silently test nothing
    sys.stderr.write(f"{exc}\n")
    raise SystemExit(2) from None
