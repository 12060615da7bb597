"""Build a Python component with componentize-py, skipping builds whose inputs did not change.

A build takes about ten seconds and is not byte-reproducible, so the output is kept and reused
while the SHA-256 of its inputs (sources, WIT, world, componentize-py version) stays the same.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

INTERFACE_DIR = Path(__file__).resolve().parent.parent / "interface"
WORLDS = ("aggregate", "process-manager", "stateless-handler")


class BuildError(Exception):
    pass


def interface_dir() -> Path:
    """The WIT package: beside the sources, or shipped inside the installed package."""
    shipped = Path(__file__).resolve().parent / "wit"
    return INTERFACE_DIR if INTERFACE_DIR.is_dir() else shipped


def inputs_digest(source_dir: Path, world: str, wit_dir: Path) -> str:
    digest = hashlib.sha256(f"{world}:{version('componentize-py')}".encode())
    for root, pattern in ((source_dir.resolve(), "*.py"), (wit_dir.resolve(), "*.wit")):
        for path in sorted(root.rglob(pattern)):
            if "__pycache__" in path.parts:
                continue
            digest.update(f"{pattern}:{path.relative_to(root)}".encode())  # the same from any cwd
            digest.update(path.read_bytes())
    return digest.hexdigest()


def build_component(source_dir: Path, world: str, output: Path, module: str = "app",
                    wit_dir: Path | None = None) -> bool:
    """Build ``source_dir/{module}.py`` for ``world`` into ``output``; False if it was up to date."""
    if world not in WORLDS:
        raise BuildError(f"unknown world {world!r}: expected one of {', '.join(WORLDS)}")
    wit = wit_dir or interface_dir()
    if not (source_dir / f"{module}.py").is_file():
        raise BuildError(f"{source_dir / (module + '.py')} does not exist")
    digest = inputs_digest(source_dir, world, wit)
    stamp = output.with_suffix(output.suffix + ".sha256")
    if output.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return False
    output.parent.mkdir(parents=True, exist_ok=True)
    tool = str(Path(sys.executable).parent / "componentize-py")
    with tempfile.TemporaryDirectory() as tmp:
        bindings = Path(tmp) / "bindings"
        partial = Path(tmp) / "out.wasm"
        _run([tool, "-d", str(wit), "-w", world, "bindings", str(bindings)])
        _run([tool, "-d", str(wit), "-w", world, "componentize", module,
              "-p", str(source_dir), "-p", str(bindings), "-o", str(partial)])
        partial.replace(output)
    stamp.write_text(digest + "\n")
    return True


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"{' '.join(command[:5])} ... failed:\n{done.stderr or done.stdout}")
