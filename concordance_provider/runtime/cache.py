"""Compiled components (`.cwasm`), cached by the content hash of the `.wasm` and engine settings.

Compiling an 18 MB Python component takes seconds; loading its compiled form takes milliseconds.
"""

from __future__ import annotations

import hashlib
import os
from importlib.metadata import version
from pathlib import Path

import structlog
import wasmtime
from wasmtime.component import Component as WasmComponent

log = structlog.get_logger(__name__)

ENGINE_SETTINGS = "epoch-interruption"


def default_cache_dir() -> Path:
    configured = os.environ.get("CONCORDANCE_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "concordance" / "cwasm"


def cache_key(wasm: bytes) -> str:
    digest = hashlib.sha256(wasm)
    digest.update(f"{version('wasmtime')}:{ENGINE_SETTINGS}".encode())
    return digest.hexdigest()


def load_compiled(engine: wasmtime.Engine, wasm_path: Path, cache_dir: Path) -> WasmComponent:
    """Load ``wasm_path``, compiling it only if no compiled copy of these exact bytes exists."""
    wasm = wasm_path.read_bytes()
    cached = cache_dir / f"{cache_key(wasm)}.cwasm"
    if cached.exists():
        try:
            return WasmComponent.deserialize_file(engine, str(cached))
        except wasmtime.WasmtimeError as exc:  # stale or truncated: compile again
            log.warning("compiled cache unusable, recompiling", path=str(cached), error=str(exc))
    log.info("compiling component", path=str(wasm_path), size=len(wasm))
    component = WasmComponent(engine, wasm)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.tmp")
    partial.write_bytes(component.serialize())
    partial.replace(cached)
    return component
