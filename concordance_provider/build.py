"""Build a Python component with componentize-py, skipping builds whose inputs did not change.

One source builds for two targets: ``embedded`` (the Concordance world itself, run in-process by
wasmtime) and ``lattice`` (wasmCloud's messaging-handler world, run by a wasmCloud 2 host and
called over NATS). For ``lattice`` the author's module is wrapped, unchanged, by the guest modules
in ``guest/``, which give it the same ``wit_world`` it was written against.

A build takes about ten seconds and is not byte-reproducible, so the output is kept and reused
while the SHA-256 of its inputs (sources, WIT, world, target, componentize-py version) stays the same.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import msgpack

INTERFACE_DIR = Path(__file__).resolve().parent.parent / "interface"
WORLDS = ("aggregate", "process-manager", "stateless-handler")
TARGETS = ("embedded", "lattice")
GUEST_DIR = Path(__file__).resolve().parent / "guest"
MESSAGING_WORLD = "messaging-handler"


class BuildError(Exception):
    pass


def interface_dir() -> Path:
    """The WIT package: beside the sources, or shipped inside the installed package."""
    shipped = Path(__file__).resolve().parent / "wit"
    return INTERFACE_DIR if INTERFACE_DIR.is_dir() else shipped


def inputs_digest(source_dir: Path, world: str, wit_dir: Path, target: str = "embedded") -> str:
    digest = hashlib.sha256(f"{world}:{target}:{version('componentize-py')}".encode())
    roots = [(source_dir.resolve(), "*.py"), (wit_dir.resolve(), "*.wit")]
    if target == "lattice":
        roots.append((GUEST_DIR, "*.py"))
        digest.update(version("msgpack").encode())
    for root, pattern in roots:
        for path in sorted(root.rglob(pattern)):
            if "__pycache__" in path.parts:
                continue
            digest.update(f"{pattern}:{path.relative_to(root)}".encode())  # the same from any cwd
            digest.update(path.read_bytes())
    return digest.hexdigest()


def build_component(source_dir: Path, world: str, output: Path, module: str = "app",
                    wit_dir: Path | None = None, target: str = "embedded") -> bool:
    """Build ``source_dir/{module}.py`` for ``world`` into ``output``; False if it was up to date."""
    if world not in WORLDS:
        raise BuildError(f"unknown world {world!r}: expected one of {', '.join(WORLDS)}")
    if target not in TARGETS:
        raise BuildError(f"unknown target {target!r}: expected one of {', '.join(TARGETS)}")
    wit = wit_dir or interface_dir()
    if not (source_dir / f"{module}.py").is_file():
        raise BuildError(f"{source_dir / (module + '.py')} does not exist")
    digest = inputs_digest(source_dir, world, wit, target)
    stamp = output.with_suffix(output.suffix + ".sha256")
    if output.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return False
    output.parent.mkdir(parents=True, exist_ok=True)
    tool = str(Path(sys.executable).parent / "componentize-py")
    with tempfile.TemporaryDirectory() as tmp:
        bindings = Path(tmp) / "bindings"
        partial = Path(tmp) / "out.wasm"
        _run([tool, "-d", str(wit), "-w", world, "bindings", str(bindings)])
        if target == "embedded":
            _run([tool, "-d", str(wit), "-w", world, "componentize", module,
                  "-p", str(source_dir), "-p", str(bindings), "-o", str(partial)])
        else:
            guest = _lattice_guest(Path(tmp), bindings, module)
            _run([tool, "-d", str(wit), "-w", MESSAGING_WORLD, "--world-module", "messaging_world",
                  "componentize", "concordance_guest", "-p", str(source_dir), "-p", str(guest),
                  "-p", str(bindings), "-o", str(partial)])
        shutil.move(partial, output)
    stamp.write_text(digest + "\n")
    return True


def _lattice_guest(tmp: Path, bindings: Path, module: str) -> Path:
    """The guest modules, msgpack (pure Python) and a ``wit_world`` whose imports the guest serves."""
    guest = tmp / "guest"
    guest.mkdir()
    for name in ("concordance_guest.py", "concordance_guest_session.py"):
        shutil.copy(GUEST_DIR / name, guest / name)
    (guest / "concordance_guest_target.py").write_text(f"MODULE = {module!r}\n")
    for override in (GUEST_DIR / "wit_world_overrides").glob("*.py"):
        if (bindings / "wit_world" / "imports" / override.name).exists():
            shutil.copy(override, bindings / "wit_world" / "imports" / override.name)
    msgpack_dir = Path(msgpack.__file__).parent
    shutil.copytree(msgpack_dir, guest / "msgpack", ignore=lambda _d, names: [n for n in names if not n.endswith(".py")])
    return guest


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"{' '.join(command[:5])} ... failed:\n{done.stderr or done.stdout}")
