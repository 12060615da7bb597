"""Commands nobody will ever handle get a clear answer instead of waiting forever.

A command published for an aggregate that has no command consumer (no daemon ever linked it),
on ``cc.commands.{aggregate}`` or ``cc.commands.{aggregate}.{key}``, is answered in ``CC_RESULTS``
with a rejection (under ``{aggregate}.{key}.{seq}``, as every outcome) and removed from the work queue.
"""

from __future__ import annotations

import asyncio
from typing import AbstractSet

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ..naming import COMMAND_PREFIX, COMMANDS_STREAM, command_filters
from ..store.commands import ordering_key
from ..store.jetstream import read_all
from ..store.results import ResultStore
from ..tracing import TRACEPARENT, received
from ..wire import CommandResult

log = structlog.get_logger(__name__)

SETTLE_SECONDS = 0.2  # let the stream store the command before looking for it


class UnroutedCommands:
    def __init__(self, nc: NATS, js: JetStreamContext, results: ResultStore,
                 served: AbstractSet[str] = frozenset()) -> None:
        self._nc = nc
        self._js = js
        self._results = results
        self._served = served  # aggregates this daemon handles: nothing to check
        self._pending: set[str] = set()
        self._again: set[str] = set()  # a command came while its aggregate's sweep ran: sweep once more
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for subject in (f"{COMMAND_PREFIX}.*", f"{COMMAND_PREFIX}.*.*"):
            await self._nc.subscribe(subject, queue="concordance-router", cb=self._on_command)
        info = await self._js.stream_info(COMMANDS_STREAM, subjects_filter=f"{COMMAND_PREFIX}.>")
        for subject in (info.state.subjects or {}):
            self._schedule(_aggregate_of(subject))

    async def _on_command(self, msg: Msg) -> None:
        self._schedule(_aggregate_of(msg.subject))

    def _schedule(self, aggregate: str) -> None:
        if aggregate in self._served:
            return
        if aggregate in self._pending:
            self._again.add(aggregate)
            return
        self._pending.add(aggregate)
        task = asyncio.create_task(self._sweep(aggregate))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handled(self, aggregate: str) -> bool:
        try:
            await self._js.consumer_info(COMMANDS_STREAM, f"AGG_CMD_{aggregate}")
            return True
        except NotFoundError:
            return False

    async def _sweep(self, aggregate: str) -> None:
        try:
            await asyncio.sleep(SETTLE_SECONDS)
            if await self._handled(aggregate):
                return
            error = f"no aggregate named {aggregate!r} is linked; command discarded"
            stored_commands = [stored for subject in command_filters(aggregate)
                               for stored in await read_all(self._nc, COMMANDS_STREAM, subject)]
            for stored in sorted(stored_commands, key=lambda stored: stored.seq):
                await self._results.record(stored.seq, CommandResult(
                    status="rejected", aggregate=aggregate, key=ordering_key(stored.subject, stored.data),
                    error=error, traceparent=received(stored.headers.get(TRACEPARENT))))
                await self._js.delete_msg(COMMANDS_STREAM, stored.seq)
                log.warning("command for unknown aggregate rejected", aggregate=aggregate, command_seq=stored.seq)
        except Exception as exc:
            log.warning("could not answer unrouted commands", aggregate=aggregate, error=str(exc))
        finally:
            self._pending.discard(aggregate)
            if aggregate in self._again:
                self._again.discard(aggregate)
                self._schedule(aggregate)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _aggregate_of(subject: str) -> str:
    """``cc.commands.{aggregate}[.{key}]`` -> aggregate."""
    return subject.split(".")[2]
