"""The daemon: connects to NATS, loads components, and runs one worker per link."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from .config import NatsOptions
from .health import Health
from .health import serve as serve_health
from .links import Role
from .manifest import ComponentSpec, Manifest
from .runtime import Component
from .runtime.wasmtime_host import Grants, WasmtimeComponent
from .status import StatusReporter
from .store.deadletters import DeadLetters
from .store.events import EventLog
from .store.readmodel import ReadModel
from .store.results import ResultStore
from .store.state import StateStore
from .store.streams import ensure_all, ensure_bucket
from .workers.aggregate import AggregateWorker
from .workers.base import ConsumerLoop
from .workers.process_manager import ProcessManagerWorker
from .workers.router import UnroutedCommands
from .workers.stateless import StatelessWorker, read_model_bucket

log = structlog.get_logger(__name__)


class DaemonFailed(Exception):
    """The daemon could not go on serving."""


# Errors that no number of reconnects will cure: say so at once instead of retrying forever.
_FATAL_AT_START = ("authorization violation", "authentication", "certificate", "ssl", "tls")


async def connect(options: NatsOptions, error_cb: Callable[[Exception], Awaitable[None]] | None = None,
                  **callbacks: object) -> tuple[NATS, JetStreamContext]:
    """Connect, waiting for a server that is not up yet but failing fast on refused credentials."""
    fatal: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        if not fatal.done() and any(word in str(exc).lower() for word in _FATAL_AT_START):
            fatal.set_result(exc)
        if error_cb is not None:
            await error_cb(exc)

    connecting = asyncio.ensure_future(nats.connect(**options.connect_kwargs(), error_cb=on_error, **callbacks))
    await asyncio.wait({connecting, fatal}, return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():
        connecting.cancel()
        raise ConnectionRefusedError(f"NATS refused the connection: {fatal.result()}")
    fatal.cancel()
    nc = connecting.result()
    return nc, nc.jetstream(domain=options.js_domain)


async def load_component(spec: ComponentSpec, cache_dir: Path | None = None) -> Component:
    component = WasmtimeComponent(
        spec.name, spec.path, spec.interest.role,
        call_timeout_ms=spec.interest.call_timeout_ms, max_memory_mb=spec.interest.max_memory_mb,
        grants=Grants(env=spec.grants.env, dirs=spec.grants.dirs), cache_dir=cache_dir,
    )
    await component.start()
    return component


@dataclass
class Daemon:
    manifest: Manifest
    nats_options: NatsOptions
    cache_dir: Path | None = None
    health_port: int | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    health: Health = field(default_factory=Health)
    _failures: list[str] = field(default_factory=list)

    async def _connect(self) -> tuple[NATS, JetStreamContext]:
        async def on_disconnect() -> None:
            if not self.stopping.is_set():
                log.warning("disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            log.info("reconnected to NATS")

        async def on_error(exc: Exception) -> None:
            log.warning("NATS error", error=str(exc))

        return await connect(self.nats_options, disconnected_cb=on_disconnect,
                             reconnected_cb=on_reconnect, error_cb=on_error)

    async def _load(self, spec: ComponentSpec) -> Component:
        return await load_component(spec, self.cache_dir)

    async def run(self) -> None:
        endpoint = await serve_health(self.health, self.health_port) if self.health_port else None
        try:
            await self._run()
        finally:
            if endpoint is not None:
                endpoint.close()

    async def _run(self) -> None:
        components = await asyncio.gather(*(self._load(s) for s in self.manifest.components))
        nc, js = await self._connect()
        self.health.nc = nc
        probe = asyncio.create_task(self.health.probe(self.stopping))
        try:
            await ensure_all(js)
            loops = await self._build(nc, js, list(zip(self.manifest.components, components)))
            served = frozenset(s.interest.name for s in self.manifest.components if s.interest.role is Role.AGGREGATE)
            router = UnroutedCommands(nc, js, ResultStore(js), served)
            for loop in loops:
                await loop.ensure()
            await router.start()
            status = StatusReporter(nc, js, self.health, self.manifest.name,
                                    list(zip(self.manifest.components, components)), loops)
            await status.start()
            log.info("concordance ready", application=self.manifest.name, nats=self.nats_options.url,
                     components=[s.name for s in self.manifest.components], daemon=status.daemon_id)
            tasks = [asyncio.create_task(loop.run(self.stopping), name=loop.spec.durable) for loop in loops]
            for task in tasks:
                task.add_done_callback(self._loop_ended)
            await self.stopping.wait()
            log.info("stopping: finishing in-flight messages")
            await router.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            probe.cancel()
            await asyncio.gather(*(c.close() for c in components))
            try:
                await nc.drain()
            except Exception:
                pass
        log.info("concordance stopped")
        if self._failures:
            raise DaemonFailed("; ".join(self._failures))

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A consumer that ends before shutdown takes the daemon down, loudly, not silently."""
        if task.cancelled() or self.stopping.is_set():
            return
        error = task.exception()
        self._failures.append(f"consumer {task.get_name()} stopped: {error}")
        log.error("consumer stopped unexpectedly; shutting down", consumer=task.get_name(), error=str(error))
        self.stopping.set()

    async def _build(self, nc: NATS, js: JetStreamContext,
                     loaded: list[tuple[ComponentSpec, Component]]) -> list[ConsumerLoop]:
        events, states, results, dead = EventLog(nc), StateStore(nc), ResultStore(js), DeadLetters(nc)
        aggregate_streams = frozenset(s.interest.stream for s, _ in loaded if s.interest.role is Role.AGGREGATE)
        loops: list[ConsumerLoop] = []
        for spec, component in loaded:
            interest = spec.interest
            if interest.role is Role.AGGREGATE:
                agg = AggregateWorker(interest, component, events, states, results, dead)
                loops.append(ConsumerLoop(js, agg.command_consumer(), agg.dispatch_commands))
                loops.append(ConsumerLoop(js, agg.event_consumer(), agg.dispatch_events))
            elif interest.role is Role.PROCESS_MANAGER:
                pm = ProcessManagerWorker(interest, component, states, nc, dead)
                loops.append(ConsumerLoop(js, pm.consumer(), pm.dispatch))
            else:
                bucket = read_model_bucket(interest)
                await ensure_bucket(js, bucket, atomic=True)
                handler = StatelessWorker(interest, component, ReadModel(nc, bucket, interest.consumer_name), events,
                                          aggregate_streams, dead)
                loops.append(ConsumerLoop(js, handler.consumer(), handler.dispatch))
        return loops
