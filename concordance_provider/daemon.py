"""The daemon: connects to NATS and runs the consumers of every linked component.

Links come from a manifest at start, from a wasmCloud host's ``HostData``, or at any time over
the provider subjects (``provider.py``). Linking a component starts its consumers; unlinking
stops them between messages, leaving their durable positions on the server, so linking it again
resumes where it stopped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from . import metrics, permissions
from .config import NatsOptions
from .health import Health
from .health import serve as serve_health
from .links import LinkError, Role
from .manifest import ComponentSpec, Manifest
from .runtime import Component
from .runtime.lattice import LatticeComponent
from .runtime.wasmtime_host import Grants, WasmtimeComponent
from .signing import Signer
from .status import StatusReporter
from .store.deadletters import DeadLetters
from .store.events import EventLog, require_duplicate_window
from .store.readmodel import ReadModel
from .store.results import ResultStore
from .store.state import StateStore
from .store.streams import DAY, ensure_all, ensure_bucket
from .stream_watch import StreamWatch
from .workers.aggregate import COMMAND_BATCHES_AT_ONCE, AggregateWorker
from .workers.base import GATHER_SECONDS, ConsumerLoop, wait_or_stop
from .workers.process_manager import ProcessManagerWorker
from .workers.router import UnroutedCommands
from .workers.stateless import StatelessWorker, read_model_bucket

log = structlog.get_logger(__name__)


class DaemonFailed(Exception):
    """The daemon could not go on serving."""


# Errors that no number of reconnects will cure: say so at once instead of retrying forever.
_FATAL_AT_START = ("authorization violation", "authentication", "certificate", "ssl", "tls")


class StoppedBeforeConnecting(Exception):
    """Asked to stop while still waiting for a NATS server that is not up."""


async def connect(options: NatsOptions, error_cb: Callable[[Exception], Awaitable[None]] | None = None,
                  stop: asyncio.Event | None = None, **callbacks: object) -> tuple[NATS, JetStreamContext]:
    """Connect, waiting for a server that is not up yet but failing fast on refused credentials;
    ``stop`` ends the wait (StoppedBeforeConnecting)."""
    fatal: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        if not fatal.done() and any(word in str(exc).lower() for word in _FATAL_AT_START):
            fatal.set_result(exc)
        if error_cb is not None:
            await error_cb(exc)

    connecting = asyncio.ensure_future(nats.connect(**options.connect_kwargs(), error_cb=on_error, **callbacks))
    stopped = asyncio.ensure_future((stop or asyncio.Event()).wait())
    await asyncio.wait({connecting, fatal, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not connecting.done():
        connecting.cancel()
        if fatal.done():
            raise ConnectionRefusedError(f"NATS refused the connection: {fatal.result()}")
        raise StoppedBeforeConnecting()
    fatal.cancel()
    nc = connecting.result()
    return nc, nc.jetstream(domain=options.js_domain)


async def load_component(spec: ComponentSpec, cache_dir: Path | None = None, nc: NATS | None = None) -> Component:
    """The component a spec names: in-process from its file, or on a wasmCloud host over ``nc``."""
    interest = spec.interest
    if spec.dispatch_subject is not None:
        if nc is None:
            raise LinkError(f"component {spec.name!r} runs on a wasmCloud host and needs a NATS connection")
        return LatticeComponent(spec.name, nc, spec.dispatch_subject, interest.role, interest.call_timeout_ms)
    if spec.path is None:
        raise LinkError(f"component {spec.name!r} names neither a file nor a dispatch subject")
    component = WasmtimeComponent(
        spec.name, spec.path, interest.role,
        call_timeout_ms=interest.call_timeout_ms, max_memory_mb=interest.max_memory_mb,
        grants=Grants(env=spec.grants.env, dirs=spec.grants.dirs), cache_dir=cache_dir,
    )
    await component.start()
    return component


@dataclass
class LinkedComponent:
    """A component with its running consumers; ``stopping`` ends them between messages."""

    spec: ComponentSpec
    component: Component
    loops: list[ConsumerLoop]
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass
class _Stores:
    events: EventLog
    states: StateStore
    results: ResultStore
    dead: DeadLetters


@dataclass
class Daemon:
    nats_options: NatsOptions
    manifest: Manifest | None = None
    cache_dir: Path | None = None
    health_port: int | None = None
    # Serves the provider subjects once connected (see provider.py); None: manifest links only.
    on_connected: Callable[["Daemon"], Awaitable[None]] | None = None
    on_stopped: Callable[[], Awaitable[None]] | None = None
    stuck_after: float = 120.0  # seconds one consumer turn may take before health says stuck
    results_ttl: float = DAY  # how long CC_RESULTS keeps each command's outcome
    signer: Signer | None = None  # signs events and state, and checks them; None: no key
    roles: frozenset[Role] | None = None  # the manifest's components of these roles only; None: all
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # connected, streams there, links made
    consumers_stopped: asyncio.Event = field(default_factory=asyncio.Event)
    health: Health = field(default_factory=Health)
    links: dict[str, LinkedComponent] = field(default_factory=dict)
    _failures: list[str] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Live views of the linked aggregates: names for the router, streams for the handlers.
    _aggregate_names: set[str] = field(default_factory=set)
    _aggregate_streams: set[str] = field(default_factory=set)
    nc: NATS | None = None
    js: JetStreamContext | None = None
    _stores: _Stores | None = None
    _looking: asyncio.Task[None] | None = None  # the look at the command stream after a reconnect
    _status: StatusReporter | None = None

    @property
    def application(self) -> str:
        return self.manifest.name if self.manifest else "lattice"

    async def _connect(self) -> tuple[NATS, JetStreamContext]:
        async def on_disconnect() -> None:
            if self._stores is not None:
                self._stores.results.disconnected()
            if not self.stopping.is_set():
                metrics.NATS_DISCONNECTS.inc()
                log.warning("disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            metrics.NATS_RECONNECTS.inc()
            log.info("reconnected to NATS")
            if self._stores is not None:
                self._looking = asyncio.create_task(self._note_stored_commands(self._stores.results))

        async def on_error(exc: Exception) -> None:
            refused = permissions.refusal(str(exc), self._permissions())
            if refused is None:
                log.warning("NATS error", error=str(exc))
            elif refused not in self._failures:  # retrying cannot help: stop, saying what is missing
                log.error("NATS refused a permission; shutting down", error=refused)
                self._failures.append(refused)
                self.stopping.set()

        return await connect(self.nats_options, disconnected_cb=on_disconnect, stop=self.stopping,
                             reconnected_cb=on_reconnect, error_cb=on_error)

    async def _note_stored_commands(self, results: ResultStore) -> None:
        """After a reconnect: until this succeeds, every command's outcome is looked for first."""
        while not self.stopping.is_set():
            try:
                await results.connected()
                return
            except Exception as exc:  # noqa: BLE001 - NATS away again: look again in a second
                log.warning("could not read the command stream's last sequence", error=str(exc))
                await wait_or_stop(self.stopping, 1.0)

    def _permissions(self) -> permissions.Permissions:
        """What this daemon needs of NATS for its links: names a refused subject exactly."""
        specs = {spec.name: spec for spec in (self.manifest.components if self.manifest else [])}
        specs.update({name: linked.spec for name, linked in self.links.items()})
        return permissions.daemon(permissions.Application.of(spec.interest for spec in specs.values()))

    async def run(self) -> None:
        endpoint = await serve_health(self.health, self.health_port, self._metrics) if self.health_port else None
        try:
            await self._run()
        except Exception:
            if self._failures:  # what failed then (a request timing out) only followed from these
                raise DaemonFailed("; ".join(self._failures)) from None
            raise
        finally:
            if endpoint is not None:
                endpoint.close()

    async def _metrics(self) -> tuple[str, bytes]:
        status = self._status
        connected = self.nc is not None and self.nc.is_connected
        body = await metrics.exposition(lambda: (self.health.report(), connected),
                                        status.report if status is not None else None)
        return metrics.CONTENT_TYPE, body

    def _runs(self, spec: ComponentSpec) -> bool:
        return self.roles is None or spec.interest.role in self.roles

    async def _run(self) -> None:
        declared = list(self.manifest.components) if self.manifest else []
        initial = [spec for spec in declared if self._runs(spec)]
        # A notifier may not publish into an aggregate's stream, linked here or not.
        self._aggregate_streams.update(str(spec.interest.stream) for spec in declared
                                       if spec.interest.role is Role.AGGREGATE)
        # Load in-process components before connecting: a broken file fails the start at once.
        loaded = await asyncio.gather(*(load_component(s, self.cache_dir) for s in initial if s.path))
        try:
            nc, js = self.nc, self.js = await self._connect()
        except StoppedBeforeConnecting:  # Ctrl-C or SIGTERM while the server was not up yet
            log.info("concordance stopped before NATS was reached", nats=self.nats_options.safe_url)
            return
        self._stores = _Stores(EventLog(nc, self.signer), StateStore(nc, signer=self.signer),
                               ResultStore(js, self._aggregate_names, nc), DeadLetters(nc))
        if self.signer is None:
            log.warning("no signing key: anyone who may publish on cc.events.> or write CC_STATE can forge "
                        "events and state")
        self.health.nc = nc
        self.health.stuck = self.stuck_consumers
        probe = asyncio.create_task(self.health.probe(self.stopping))
        router = UnroutedCommands(nc, js, self._stores.results, self._aggregate_names)
        try:
            await ensure_all(js, results_ttl=self.results_ttl)
            await self._stores.results.connected()
            if self.signer is not None:
                await require_duplicate_window(js)
            self.health.watch = StreamWatch(js, self._read_model_buckets, self.results_ttl)
            preloaded = iter(loaded)
            for spec in initial:
                await self.link(spec, next(preloaded) if spec.path else None)
            if self.roles is None or Role.AGGREGATE in self.roles:  # else another process answers them
                await router.start()
            status = self._status = StatusReporter(nc, js, self.health, self.application,
                                                   lambda: list(self.links.values()))
            await status.start()
            if self.on_connected is not None:
                await self.on_connected(self)
            log.info("concordance ready", application=self.application, nats=self.nats_options.safe_url,
                     components=list(self.links), daemon=status.daemon_id, signed=self.signer is not None)
            self.ready.set()
            await self.stopping.wait()
            log.info("stopping: finishing in-flight messages")
            await router.stop()
        finally:
            probe.cancel()
            async with self._lock:  # a link being made now is made before this, then stopped
                stopped = await asyncio.gather(*(self._stop(name) for name in list(self.links)),
                                               return_exceptions=True)
                for error in (str(e) or type(e).__name__ for e in stopped if isinstance(e, BaseException)):
                    self._failures.append(f"a component did not stop cleanly: {error}")
                    log.error("a component did not stop cleanly", error=error)
            self.consumers_stopped.set()
            if self.on_stopped is not None:
                await self.on_stopped()
            try:
                await nc.drain()
            except Exception:
                pass
        log.info("concordance stopped")
        if self._failures:
            raise DaemonFailed("; ".join(self._failures))

    def _read_model_buckets(self) -> list[str]:
        return [read_model_bucket(linked.spec.interest) for linked in self.links.values()
                if linked.spec.interest.role in (Role.PROJECTOR, Role.NOTIFIER)]

    def stuck_consumers(self) -> list[str]:
        return [loop.spec.durable for linked in self.links.values() for loop in linked.loops
                if loop.turn_seconds() > self.stuck_after]

    async def link(self, spec: ComponentSpec, component: Component | None = None) -> None:
        """Start a component's consumers (replacing its earlier link, if any); LinkError if it
        cannot be linked beside the others."""
        async with self._lock:
            if self.stopping.is_set():
                raise LinkError("the daemon is shutting down")
            current = self.links.get(spec.name)
            if current is not None and current.spec == spec:
                return
            self._check_unique(spec)
            # The new link is made ready before the old one stops: if it cannot be, the old one stays.
            if component is None:
                component = await load_component(spec, self.cache_dir, self.nc)
            try:
                linked = LinkedComponent(spec, component, await self._loops(spec, component))
                for loop in linked.loops:
                    await loop.ensure()
            except BaseException:
                await component.close()
                raise
            if current is not None:
                await self._stop(spec.name)
            for loop in linked.loops:
                task = asyncio.create_task(loop.run(linked.stopping), name=loop.spec.durable)
                task.add_done_callback(self._loop_ended)
                linked.tasks.append(task)
            self.links[spec.name] = linked
            metrics.linked(spec.interest.name if spec.interest.role is Role.AGGREGATE else None,
                           [loop.spec.durable for loop in linked.loops])
            if spec.interest.role is Role.AGGREGATE:
                self._aggregate_names.add(spec.interest.name)
                self._aggregate_streams.add(str(spec.interest.stream))
            log.info("component linked", component=spec.name, role=spec.interest.role.value,
                     name=spec.interest.name, runs=spec.location)

    async def unlink(self, name: str) -> bool:
        """Stop a component's consumers between messages; False if it was not linked."""
        async with self._lock:
            return await self._stop(name)

    async def _stop(self, name: str) -> bool:
        linked = self.links.pop(name, None)
        if linked is None:
            return False
        linked.stopping.set()
        await asyncio.gather(*linked.tasks, return_exceptions=True)
        await linked.component.close()
        if linked.spec.interest.role is Role.AGGREGATE:
            self._aggregate_names.discard(linked.spec.interest.name)
            self._aggregate_streams.discard(str(linked.spec.interest.stream))
        log.info("component unlinked", component=name)
        return True

    def _check_unique(self, spec: ComponentSpec) -> None:
        for other in self.links.values():
            if other.spec.name != spec.name and other.spec.interest.consumer_name == spec.interest.consumer_name:
                raise LinkError(f"{other.spec.name!r} already declares {spec.interest.consumer_name}; "
                                f"{spec.name!r} may not declare it too")

    def fail(self, reason: str) -> None:
        """Stop, and exit saying ``reason``: something this daemon depends on ended."""
        self._failures.append(reason)
        log.error("shutting down", reason=reason)
        self.stopping.set()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A consumer that ends before it is told to takes the daemon down, loudly, not silently."""
        if task.cancelled() or self.stopping.is_set():
            return
        error = task.exception()
        if error is None:
            return  # unlinked
        self._failures.append(f"consumer {task.get_name()} stopped: {error}")
        log.error("consumer stopped unexpectedly; shutting down", consumer=task.get_name(), error=str(error))
        self.stopping.set()

    async def _loops(self, spec: ComponentSpec, component: Component) -> list[ConsumerLoop]:
        assert self.js is not None and self.nc is not None and self._stores is not None
        js, stores, interest = self.js, self._stores, spec.interest
        if interest.role is Role.AGGREGATE:
            agg = AggregateWorker(interest, component, stores.events, stores.states, stores.results, stores.dead)
            return [ConsumerLoop(js, agg.command_consumer(), agg.dispatch_commands, overlap=COMMAND_BATCHES_AT_ONCE),
                    ConsumerLoop(js, agg.event_consumer(), agg.dispatch_events, gather=GATHER_SECONDS)]
        if interest.role is Role.PROCESS_MANAGER:
            pm = ProcessManagerWorker(interest, component, stores.states, self.nc, stores.dead, self.signer)
            return [ConsumerLoop(js, pm.consumer(), pm.dispatch)]
        bucket = read_model_bucket(interest)
        await ensure_bucket(js, bucket, atomic=True)
        handler = StatelessWorker(interest, component, ReadModel(self.nc, bucket, interest.consumer_name),
                                  stores.events, self._aggregate_streams, stores.dead)
        return [ConsumerLoop(js, handler.consumer(), handler.dispatch, gather=GATHER_SECONDS)]
