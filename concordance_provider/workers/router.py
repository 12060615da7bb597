"""Commands nobody will ever handle get a clear answer instead of waiting forever.

A command published for an aggregate that has no command consumer (no daemon ever linked it)
is answered in ``CC_RESULTS`` with a rejection and removed from the work queue.
"""

from __future__ import annotations

import asyncio
from typing import AbstractSet

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ..naming import COMMAND_PREFIX, COMMANDS_STREAM, command_subject
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
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._nc.subscribe(f"{COMMAND_PREFIX}.*", queue="concordance-router", cb=self._on_command)
        info = await self._js.stream_info(COMMANDS_STREAM, subjects_filter=f"{COMMAND_PREFIX}.*")
        for subject in (info.state.subjects or {}):
            self._schedule(subject.split(".", 2)[2])

    async def _on_command(self, msg: Msg) -> None:
        self._schedule(msg.subject.split(".", 2)[2])

    def _schedule(self, aggregate: str) -> None:
        if aggregate in self._pending or aggregate in self._served:
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
            for stored in await read_all(self._nc, COMMANDS_STREAM, command_subject(aggregate)):
                await self._results.record(stored.seq, CommandResult(
                    status="rejected", aggregate=aggregate, error=error,
                    traceparent=received(stored.headers.get(TRACEPARENT))))
                await self._js.delete_msg(COMMANDS_STREAM, stored.seq)
                log.warning("command for unknown aggregate rejected", aggregate=aggregate, command_seq=stored.seq)
        except Exception as exc:
            log.warning("could not answer unrouted commands", aggregate=aggregate, error=str(exc))
        finally:
            self._pending.discard(aggregate)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
