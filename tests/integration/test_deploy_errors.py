"""`concordance deploy` says clearly what is missing instead of failing halfway with a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from concordance_provider.nats_server import free_port

from .harness import example_manifest

pytestmark = pytest.mark.integration

BUILD = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "build"


def _deploy(manifest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "concordance_provider.cli", "deploy", str(manifest),
                           "--build-dir", str(BUILD), *args], capture_output=True, text=True, timeout=300)


def test_a_component_without_source_is_named(tmp_path):
    manifest = example_manifest(tmp_path, {})
    manifest.write_text(manifest.read_text().replace("source: ", "# source: ", 1))
    done = _deploy(manifest, "--registry", "127.0.0.1:1")
    assert done.returncode == 2
    assert "component 'bankaccount-aggregate' needs properties.source" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreachable_registry_is_named(tmp_path):
    port = free_port()  # nothing listens there
    done = _deploy(example_manifest(tmp_path, {}), "--registry", f"127.0.0.1:{port}")
    assert done.returncode == 2
    assert f"pushing 127.0.0.1:{port}/bankaccount-bankaccount-aggregate:" in done.stderr
    assert "Traceback" not in done.stderr
