"""Shared fixtures: real components built from source (cached by content hash), real NATS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from concordance_provider.build import build_component

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "bankaccount"
BUILD = EXAMPLE / "build"
EXAMPLE_COMPONENTS = {
    "bankaccount_aggregate": ("aggregate", "aggregate"),
    "bankaccount_projector": ("projector", "stateless-handler"),
    "wiretransfer_process_manager": ("process_manager", "process-manager"),
    "otherbank_gateway": ("gateway", "stateless-handler"),
}
TEST_BUILD = ROOT / "tests" / "components" / "build"


@pytest.fixture(scope="session")
def example_components() -> dict[str, Path]:
    """The bank example's four components, built unless their sources are unchanged."""
    built = {}
    for name, (folder, world) in EXAMPLE_COMPONENTS.items():
        output = BUILD / f"{name}.wasm"
        build_component(EXAMPLE / folder, world, output)
        built[name] = output
    return built


@pytest.fixture(scope="session")
def looper_component() -> Path:
    """A component built the way an outside author would: componentize-py and interface/ only."""
    source = ROOT / "tests" / "components" / "looper"
    output = TEST_BUILD / "looper.wasm"
    stamp = output.with_suffix(".src")
    digest = (source / "app.py").read_text() + (ROOT / "interface" / "eventsourcing.wit").read_text()
    if output.exists() and stamp.exists() and stamp.read_text() == digest:
        return output
    tool = str(Path(sys.executable).parent / "componentize-py")
    bindings = TEST_BUILD / "looper-bindings"
    subprocess.run(["rm", "-rf", str(bindings)], check=True)
    TEST_BUILD.mkdir(parents=True, exist_ok=True)
    wit = str(ROOT / "interface")
    subprocess.run([tool, "-d", wit, "-w", "aggregate", "bindings", str(bindings)], check=True)
    subprocess.run([tool, "-d", wit, "-w", "aggregate", "componentize", "app", "-p", str(source),
                    "-p", str(bindings), "-o", str(output)], check=True)
    stamp.write_text(digest)
    return output


@pytest.fixture(scope="session", autouse=True)
def compiled_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Compiled components are cached by content hash in the user's cache unless told otherwise."""
    os.environ.setdefault("CONCORDANCE_CACHE_DIR", str(ROOT / ".pytest_cache" / "cwasm"))
