"""In-process runtime: components run in this process under wasmtime, one sandbox each.

Every call has a deadline (epoch interruption) and a memory limit. A trap or timeout fails that
one call and throws the poisoned store away; the next call gets a fresh instance. A stateless
handler's calls run on one thread per component (a store is not thread-safe), so the event loop
serves their read-model reads meanwhile; an aggregate's or process manager's short calls are made
on the event loop itself (see ``INLINE_TICKS``), and never two calls of one component at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import structlog
import wasmtime
from wasmtime.component import Linker

from ..links import Role
from .cache import default_cache_dir, load_compiled
from .call_caps import CallBudget, OverCap
from .component import (
    ComponentFailed,
    Decision,
    Event,
    HandlerEffects,
    OutputCommand,
    ProcessManagerAck,
    RejectedByComponent,
)
from .stats import CallStats
from .wit_calls import Call, add_host_func, compile_call, imported_funcs

log = structlog.get_logger(__name__)

EPOCH_TICK_SECONDS = 0.01
# An aggregate's or process manager's call reaches no host function, so it is made on the event
# loop itself, saving two thread switches (about 0.2 ms each) per call, as long as it takes at
# most this many epoch ticks (20-30 ms); one that takes longer is stopped and made again on the
# component's thread (the call is pure: making it again changes nothing). If it used at least
# INLINE_CPU_SECONDS of CPU meanwhile, so are all its later calls; if not, the process was
# waiting for a core (a busy machine), and its later calls stay on the event loop.
INLINE_TICKS = 3
INLINE_CPU_SECONDS = 0.01
PACKAGE = "concordance:eventsourcing"
VERSION = "0.1.0"

WORLD_EXPORTS: dict[Role, tuple[str, str]] = {
    Role.AGGREGATE: ("aggregate", "handle-command, apply-event"),
    Role.PROCESS_MANAGER: ("process-manager", "handle-event"),
    Role.PROJECTOR: ("stateless-handler", "apply-stateless-event"),
    Role.NOTIFIER: ("stateless-handler", "apply-stateless-event"),
}


class ComponentLoadError(Exception):
    """A component file that cannot be used for its role."""


class _OverInlineDeadline(Exception):
    """A call on the event loop ran past ``INLINE_TICKS``: make it again on the component's thread."""


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """``callback`` on ``loop``, from another thread; nothing if the loop has closed meanwhile."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass


@dataclass(frozen=True)
class Grants:
    """What a component may reach beyond its own memory. Nothing unless configured."""

    env: dict[str, str] = field(default_factory=dict)
    dirs: dict[str, str] = field(default_factory=dict)  # guest path -> host path, read-only


class SharedEngine:
    """One wasmtime engine per process, with the ticker that drives call deadlines."""

    _instance: "SharedEngine | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        config = wasmtime.Config()
        config.epoch_interruption = True
        self.engine = wasmtime.Engine(config)
        self._stop = threading.Event()
        threading.Thread(target=self._tick, name="wasm-epoch", daemon=True).start()

    def _tick(self) -> None:
        while not self._stop.wait(EPOCH_TICK_SECONDS):
            self.engine.increment_epoch()

    @classmethod
    def get(cls) -> "SharedEngine":
        with cls._lock:
            if cls._instance is None:
                cls._instance = SharedEngine()
            return cls._instance


def _record(**fields: Any) -> SimpleNamespace:
    """wasmtime-py reads record fields by their kebab-case WIT names."""
    return SimpleNamespace(**{k.replace("_", "-"): v for k, v in fields.items()})


def _event_record(event: Event) -> SimpleNamespace:
    return _record(event_type=event.event_type, stream=event.stream, payload=event.payload)


def _text(data: bytes) -> str:
    return bytes(data).decode(errors="replace").rstrip()


def _as_event(value: Any) -> Event:
    return Event(getattr(value, "event-type"), value.stream, value.payload)


class WasmtimeComponent:
    """A component file loaded for one role, called on its own thread."""

    def __init__(
        self,
        name: str,
        path: Path,
        role: Role,
        *,
        call_timeout_ms: int,
        max_memory_mb: int,
        grants: Grants | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.role = role
        self._ticks = max(1, -(-call_timeout_ms // int(EPOCH_TICK_SECONDS * 1000)))
        self._memory = max_memory_mb * 1024 * 1024
        self._grants = grants or Grants()
        self._cache_dir = cache_dir or default_cache_dir()
        self._shared = SharedEngine.get()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"wasm-{name}")
        self._inline = role in (Role.AGGREGATE, Role.PROCESS_MANAGER)  # see INLINE_TICKS
        self._in_thread = 0  # calls handed to the executor and not yet done: none inline meanwhile
        self._store: wasmtime.Store | None = None
        self._funcs: dict[str, Any] = {}
        self._calls: dict[str, Call] = {}  # each export's call, its WIT types reflected at instantiation
        self._effects: HandlerEffects | None = None
        self._budget: CallBudget | None = None  # the caps on what the current call writes and publishes
        self._log = log.bind(component=name)
        self.stats = CallStats(component=name)

    # -- loading -------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        if not self.path.is_file():
            raise ComponentLoadError(f"component {self.name!r}: no such file {self.path}")
        engine = self._shared.engine
        try:
            self._component = load_compiled(engine, self.path, self._cache_dir)
        except wasmtime.WasmtimeError as exc:
            raise ComponentLoadError(
                f"component {self.name!r}: {self.path} is not a WebAssembly component: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        world, wanted = WORLD_EXPORTS[self.role]
        exports = set(self._component.type.exports(engine))
        missing = [name for name in wanted.split(", ") if name not in exports]
        if missing:
            raise ComponentLoadError(
                f"component {self.name!r} ({self.path.name}) has role {self.role.value} but does "
                f"not export {', '.join(missing)} of world {PACKAGE}/{world}@{VERSION}; "
                f"it exports: {', '.join(sorted(exports)) or 'nothing'}"
            )
        self._linker = self._make_linker(engine)
        self._instantiate()

    def _make_linker(self, engine: wasmtime.Engine) -> Linker:
        """A linker for ``self._component`` alone: its host functions convert their arguments and
        results with the types that component imports them with, reflected here once (wasmtime-py's
        add_func reflects them on every call)."""
        linker = Linker(engine)
        linker.add_wasip2()
        with linker.root() as root:
            with root.add_instance(f"{PACKAGE}/types@{VERSION}"):
                pass
            read_model_name = f"{PACKAGE}/read-model@{VERSION}"
            types = imported_funcs(self._component, engine, read_model_name)
            with root.add_instance(read_model_name) as read_model:
                add_host_func(read_model, "get", lambda _store, key: self._current_effects().get(key),
                              types.get("get"))
                add_host_func(read_model, "put", lambda _store, key, value: self._put(key, value), types.get("put"))
                add_host_func(read_model, "delete", lambda _store, key: self._put(key, None), types.get("delete"))
            publisher_name = f"{PACKAGE}/event-publisher@{VERSION}"
            types = imported_funcs(self._component, engine, publisher_name)
            with root.add_instance(publisher_name) as publisher:
                add_host_func(publisher, "publish", self._publish, types.get("publish"))
        return linker

    def _wasi(self) -> wasmtime.WasiConfig:
        wasi = wasmtime.WasiConfig()
        wasi.env = list(self._grants.env.items())
        for guest, host in self._grants.dirs.items():
            wasi.preopen_dir(host, guest, fs_mutable=False)
        wasi.stdout_custom = lambda data: self._log.info("component stdout", text=_text(data))
        wasi.stderr_custom = lambda data: self._log.warning("component stderr", text=_text(data))
        return wasi

    def _instantiate(self) -> None:
        store = wasmtime.Store(self._shared.engine)
        store.set_wasi(self._wasi())
        store.set_limits(memory_size=self._memory)
        store.set_epoch_deadline(self._ticks * 100)  # instantiation of a Python component is slow
        instance = self._linker.instantiate(store, self._component)
        self._funcs, self._calls = {}, {}
        for name in WORLD_EXPORTS[self.role][1].split(", "):
            func = instance.get_func(store, name)
            if func is None:
                raise ComponentLoadError(f"component {self.name!r}: export {name} is not a function")
            self._funcs[name] = func
            self._calls[name] = compile_call(func, store)
        self._store = store

    # -- host functions ------------------------------------------------------------------------

    def _current_effects(self) -> HandlerEffects:
        if self._effects is None:
            raise RuntimeError("read-model and event-publisher are only available to stateless handlers")
        return self._effects

    def _put(self, key: str, value: str | None) -> None:
        self._current_effects()
        assert self._budget is not None
        try:
            self._budget.put(key, value)
        except OverCap as exc:  # refused as it is made: the daemon does not hold the value
            self._log.warning("read-model write over its cap; the call fails", key=key, error=str(exc))
            raise

    def _publish(self, _store: Any, key: str, event: Any) -> str | None:
        effects = self._current_effects()
        published = _as_event(event)
        refusal = effects.check_publish(key, published)
        if refusal is None:
            assert self._budget is not None
            try:
                self._budget.publish(key, published)
            except OverCap as exc:
                self._log.warning("publish over its cap; the call fails", key=key, error=str(exc))
                raise
            effects.published.append((key, published))
        return refusal

    # -- calls ---------------------------------------------------------------------------------

    def _call(self, export: str, *args: Any, ticks: int | None = None) -> Any:
        """Call ``export`` within ``ticks`` epoch ticks (its deadline if None)."""
        if self._store is None:
            self._instantiate()
        store = self._store
        assert store is not None
        func = self._funcs[export]
        store.set_epoch_deadline(ticks or self._ticks)
        try:
            result = self._calls[export](store, *args)
            func.post_return(store)
        except wasmtime.WasmtimeError as exc:
            self._store = None  # poisoned: the next call starts from a fresh instance
            if ticks is not None and "wasm trap: interrupt" in str(exc):
                raise _OverInlineDeadline() from None
            reason = self._trap_reason(str(exc))
            raise ComponentFailed(f"component {self.name!r} failed in {export}: {reason}") from None
        except BaseException as exc:  # a host function failed: the instance is stuck mid-call
            self._store = None
            if isinstance(exc, ValueError):  # the component passed it a bad argument
                raise ComponentFailed(f"component {self.name!r} failed in {export}: {exc}") from None
            raise  # e.g. NATS away: not the component's fault
        if isinstance(result, str):
            raise RejectedByComponent(result)
        return result

    def _trap_reason(self, message: str) -> str:
        """wasmtime puts a backtrace first and the cause last: keep the cause."""
        if "wasm trap: interrupt" in message:
            return f"call exceeded its deadline of {self._ticks * EPOCH_TICK_SECONDS:.2f}s"
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        causes = [line for line in lines if "trap" in line or "memory" in line or "Caused by" in line]
        return (causes or lines or ["unknown trap"])[-1]

    async def _run(self, export: str, *args: Any, effects: HandlerEffects | None = None) -> Any:
        def call(ticks: int | None = None) -> Any:
            self._effects = effects
            self._budget = CallBudget(effects) if effects is not None else None
            started, error = time.perf_counter(), None
            try:
                return self._call(export, *args, ticks=ticks)
            except ComponentFailed as exc:  # a rejection is an answer, not a failure
                error = exc
                raise
            except _OverInlineDeadline:
                started = None  # not a call of its own: it is made again
                raise
            finally:
                self._effects, self._budget = None, None
                if started is not None:
                    self.stats.record(started, error, export)

        # instantiating is slow: not here; and never beside a call on the thread (one store, one call)
        if self._inline and effects is None and self._store is not None and not self._in_thread:
            cpu = time.thread_time()
            try:
                return call(INLINE_TICKS)
            except _OverInlineDeadline:
                used_ms = round((time.thread_time() - cpu) * 1000, 1)
                if used_ms >= INLINE_CPU_SECONDS * 1000:
                    self._inline = False
                    self._log.warning("component call took over the event loop's share; its calls are made on "
                                      "the component's thread from now on", export=export, cpu_ms=used_ms,
                                      most_ms=INLINE_TICKS * EPOCH_TICK_SECONDS * 1000)
                else:
                    self._log.info("component call outlasted the event loop's share waiting for a CPU; made "
                                   "again on the component's thread", export=export, cpu_ms=used_ms)
        loop = asyncio.get_running_loop()
        if not self._inline:
            return await loop.run_in_executor(self._executor, call)
        # counted until the thread is done with it, even if the caller stops waiting first
        self._in_thread += 1
        on_thread = self._executor.submit(call)
        on_thread.add_done_callback(lambda _: _call_soon(loop, self._thread_call_done))
        return await asyncio.wrap_future(on_thread)

    def _thread_call_done(self) -> None:
        self._in_thread -= 1

    async def handle_command(
        self, aggregate: str, command_type: str, key: str, state: str | None, payload: str
    ) -> list[Event]:
        command = _record(aggregate=aggregate, command_type=command_type, key=key, state=state, payload=payload)
        events = await self._run("handle-command", command)
        try:
            return [_as_event(e) for e in events]
        except (AttributeError, TypeError):
            raise ComponentFailed(f"component {self.name!r} returned malformed events") from None

    async def decide(self, aggregate: str, command_type: str, key: str, state: str | None,
                     payload: str) -> Decision:
        """In-process calls are cheap: the worker folds the events itself."""
        return Decision(await self.handle_command(aggregate, command_type, key, state, payload))

    async def apply_event(self, event: Event, state: str | None) -> str | None:
        try:
            ack = await self._run("apply-event", _record(event=_event_record(event), state=state))
        except RejectedByComponent as exc:
            raise ComponentFailed(f"component {self.name!r} refused to apply {event.event_type}: {exc}") from None
        return ack.state

    async def handle_event(self, event: Event, state: str | None) -> ProcessManagerAck:
        ack = await self._run("handle-event", _record(event=_event_record(event), state=state))
        commands = [
            OutputCommand(
                getattr(c, "command-type"), getattr(c, "aggregate-stream"),
                getattr(c, "aggregate-key"), getattr(c, "json-payload"),
            )
            for c in ack.commands
        ]
        return ProcessManagerAck(ack.state, commands)

    async def apply_stateless_event(self, event: Event, effects: HandlerEffects) -> None:
        await self._run("apply-stateless-event", _event_record(event), effects=effects)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._store = None
