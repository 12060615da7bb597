"""Command outcomes in KV ``CC_RESULTS``, keyed by the command's CC_COMMANDS sequence.

A client that sent a command with request/reply got ``{"stream":"CC_COMMANDS","seq":N}`` back;
``concordance result N`` (or ``nats kv get CC_RESULTS N``) tells it what became of the command.
Each outcome recorded is counted in the daemon's metrics, with the events it appended.
"""

from __future__ import annotations

from collections.abc import Set

from nats.js import JetStreamContext

from ..metrics import COMMANDS, EVENTS_APPENDED
from ..naming import RESULTS_BUCKET
from ..wire import CommandResult

UNLINKED = "_unlinked"  # metrics label of aggregates nobody linked: clients choose those names


class ResultStore:
    def __init__(self, js: JetStreamContext, aggregates: Set[str] | None = None) -> None:
        """``aggregates``: the linked aggregates' names (a live view), to keep metric labels to those."""
        self._js = js
        self._kv = None
        self._aggregates = aggregates

    async def record(self, command_seq: int, result: CommandResult) -> None:
        if self._kv is None:
            self._kv = await self._js.key_value(RESULTS_BUCKET)
        await self._kv.put(str(command_seq), result.model_dump_json(exclude_none=True).encode())
        aggregate = result.aggregate
        if self._aggregates is not None and aggregate not in self._aggregates:
            aggregate = UNLINKED
        COMMANDS.labels(aggregate, result.status).inc()
        if result.status == "accepted":
            for event_type in result.events:
                EVENTS_APPENDED.labels(aggregate, event_type).inc()
