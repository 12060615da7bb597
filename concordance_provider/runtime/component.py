"""The interface every component runtime offers the workers, and the values it exchanges."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from .stats import CallStats


@dataclass(frozen=True)
class Event:
    event_type: str
    stream: str
    payload: str  # JSON text


@dataclass(frozen=True)
class OutputCommand:
    command_type: str
    aggregate_stream: str
    aggregate_key: str
    json_payload: str


@dataclass(frozen=True)
class Decision:
    """A command's events, and, if the runtime folded them where it decided, the state after them.

    A remote runtime folds in the same call to save a round trip per event; the worker uses that
    state only if the events it folded are exactly the events it will store."""

    events: list[Event]
    folded: bool = False
    state: str | None = None


@dataclass(frozen=True)
class ProcessManagerAck:
    state: str | None
    commands: list[OutputCommand]


class RejectedByComponent(Exception):
    """The component answered with an error `result`: a business decision, not a fault."""


class ComponentFailed(Exception):
    """The component trapped, ran out of time or memory, or returned something unusable."""


class ComponentUnavailable(Exception):
    """Nobody answered for the component (its host is down or gone): an outage, not the
    message's fault, so the message waits without being counted against it."""


@dataclass
class HandlerEffects:
    """What a stateless handler asked for during one call; applied only if the call succeeds."""

    read: Callable[[str], str | None]
    check_publish: Callable[[str, Event], str | None]  # an error to return, or None if allowed
    puts: dict[str, str | None] = field(default_factory=dict)  # None: delete
    published: list[tuple[str, Event]] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        if key in self.puts:
            return self.puts[key]
        return self.read(key)


class Component(Protocol):
    """A loaded component of one role, callable from the event loop."""

    name: str
    stats: CallStats

    async def handle_command(
        self, aggregate: str, command_type: str, key: str, state: str | None, payload: str
    ) -> list[Event]: ...

    async def decide(
        self, aggregate: str, command_type: str, key: str, state: str | None, payload: str
    ) -> Decision:
        """handle-command, with the fold of its events where that saves calls."""
        ...

    async def apply_event(self, event: Event, state: str | None) -> str | None:
        """Fold one event; an ``err`` answer raises ComponentFailed (folding has no decisions)."""

    async def handle_event(self, event: Event, state: str | None) -> ProcessManagerAck: ...

    async def apply_stateless_event(self, event: Event, effects: HandlerEffects) -> None: ...

    async def close(self) -> None: ...
