"""What one stateless handler call may write to its read model and publish, checked by the host.

A write or publish over a cap fails the call as the component's fault (retried, then a dead
letter), and is refused as it is made, so the daemon never holds more than the caps of one call:
a component's memory limit says nothing about what it hands the host.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..store.readmodel import MAX_WRITES_PER_COMMIT
from .component import Event, HandlerEffects

MIB = 1024 * 1024


class OverCap(ValueError):
    """A handler call wrote or published more than one call may (a bad argument: its fault)."""


@dataclass(frozen=True)
class CallCaps:
    # A value over the NATS default maximum payload could not be stored anyway.
    value_bytes: int = MIB
    write_bytes: int = 4 * MIB  # the read-model values one call holds at once
    write_keys: int = MAX_WRITES_PER_COMMIT  # one event's writes go in one atomic commit
    events: int = 100
    event_bytes: int = MIB
    publish_bytes: int = 4 * MIB


CAPS = CallCaps()


def text_size(text: str | None, cap: int) -> int:
    """The UTF-8 size of ``text``; a text longer than ``cap`` characters is not encoded to know
    it is too big (each character takes at least a byte)."""
    if text is None:
        return 0
    return len(text) if len(text) > cap else len(text.encode(errors="replace"))


class CallBudget:
    """What one call has written and published so far, checked against the caps as it goes."""

    def __init__(self, effects: HandlerEffects, caps: CallCaps = CAPS) -> None:
        self._effects = effects
        self._caps = caps
        self._sizes: dict[str, int] = {}  # bytes of each key's current value
        self.write_bytes = 0
        self.publish_bytes = 0

    def put(self, key: str, value: str | None) -> None:
        """Keep a write (None deletes) or raise OverCap, keeping nothing of it."""
        caps, puts = self._caps, self._effects.puts
        size = text_size(value, caps.value_bytes)
        if size > caps.value_bytes:
            raise OverCap(f"read-model value for key {key!r} is over the cap of {caps.value_bytes} bytes "
                          f"per value ({size} characters or more)")
        if key not in puts and len(puts) >= caps.write_keys:
            raise OverCap(f"read-model write of key {key!r} is over the cap of {caps.write_keys} keys per call")
        total = self.write_bytes - self._sizes.get(key, 0) + size
        if total > caps.write_bytes:
            raise OverCap(f"read-model write of key {key!r} brings this call's writes to {total} bytes, "
                          f"over the cap of {caps.write_bytes}")
        puts[key] = value
        self._sizes[key] = size
        self.write_bytes = total

    def publish(self, key: str, event: Event) -> None:
        """Count an event the component publishes, or raise OverCap."""
        caps = self._caps
        if len(self._effects.published) >= caps.events:
            raise OverCap(f"event {event.event_type!r} for key {key!r} is over the cap of {caps.events} "
                          f"events published per call")
        size = text_size(event.payload, caps.event_bytes)
        if size > caps.event_bytes:
            raise OverCap(f"event {event.event_type!r} for key {key!r} has a payload over the cap of "
                          f"{caps.event_bytes} bytes ({size} characters or more)")
        if self.publish_bytes + size > caps.publish_bytes:
            raise OverCap(f"event {event.event_type!r} for key {key!r} brings this call's events to "
                          f"{self.publish_bytes + size} bytes, over the cap of {caps.publish_bytes}")
        self.publish_bytes += size


def check_effects(effects: HandlerEffects, caps: CallCaps = CAPS) -> None:
    """The caps held against a call's effects after it returned (a runtime whose component
    hands them over at the end, e.g. in its reply); OverCap names the first one exceeded."""
    budget = CallBudget(HandlerEffects(read=effects.read, check_publish=effects.check_publish), caps)
    for key, value in effects.puts.items():
        budget.put(key, value)
    for key, event in effects.published:
        budget.publish(key, event)
        budget._effects.published.append((key, event))
