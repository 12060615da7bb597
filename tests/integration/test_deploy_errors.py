"""`concordance deploy` and `undeploy` say clearly what is missing instead of failing halfway with a
traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from concordance_provider.nats_server import free_port

from .harness import example_manifest, nats_server

pytestmark = pytest.mark.integration

BUILD = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "build"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "concordance_provider.cli", *args], capture_output=True, text=True,
                          timeout=300)


def _deploy(manifest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _cli("deploy", str(manifest), "--build-dir", str(BUILD), *args)


def test_a_component_a_host_cannot_pull_is_named(tmp_path):
    manifest = example_manifest(tmp_path, {})
    manifest.write_text(manifest.read_text().replace("source: ", "# source: ", 1))
    done = _deploy(manifest, "--registry", "127.0.0.1:1")
    assert done.returncode == 2
    assert "component 'bankaccount-aggregate' has nothing a wasmCloud host can pull" in done.stderr
    assert "bankaccount_aggregate.wasm is a local file" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_source_without_a_registry_is_named(tmp_path):
    done = _deploy(example_manifest(tmp_path, {}))
    assert done.returncode == 2
    assert "component 'bankaccount-aggregate' is built from its source and pushed: give --registry" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreachable_registry_is_named(tmp_path):
    port = free_port()  # nothing listens there
    done = _deploy(example_manifest(tmp_path, {}), "--registry", f"127.0.0.1:{port}")
    assert done.returncode == 2
    assert f"pushing 127.0.0.1:{port}/bankaccount-bankaccount-aggregate:" in done.stderr
    assert "Traceback" not in done.stderr


def test_no_host_is_named_after_showing_the_wait(tmp_path):
    """An OCI image is run as written (nothing built or pushed); with no host on the lattice, the
    wait for a heartbeat is shown every 5 s while it lasts, then named. --host-wait 11 instead of
    the default 30 s: the same lines, two of them progress lines instead of five."""
    manifest = example_manifest(tmp_path, {})
    text = manifest.read_text().replace("image: file://", "image: 127.0.0.1:1/bank:0.1.0 # ").replace("source: ", "# ")
    manifest.write_text(text)
    with nats_server(tmp_path) as server:
        done = _deploy(manifest, "--nats-url", server.url, "--host-wait", "11")
    assert done.returncode == 2, done.stderr
    assert "component runs its image as written" in done.stderr
    assert re.search(r"waiting for a wasmCloud host's heartbeat .*timeout_s=11\b", done.stderr), done.stderr
    # every 5 s of the 11 s, saying how long it has waited
    assert re.findall(r"still waiting for a host's heartbeat +waited_s=(\d+)", done.stderr) == ["5", "10"], done.stderr
    assert "no wasmCloud host sent a heartbeat within 11s" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_wait_for_a_host_is_30_s_unless_told():
    shown = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "deploy", "--help"], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"--host-wait .*\[default: 30\.0\]", shown.stdout), shown.stdout
    refused = _cli("deploy", "app.yaml", "--host-wait", "0")
    assert refused.returncode == 2 and "Invalid value for '--host-wait'" in refused.stderr, refused.stderr


def test_undeploying_what_was_never_deployed_says_so(tmp_path):
    with nats_server(tmp_path) as server:
        done = _cli("undeploy", str(example_manifest(tmp_path, {})), "--nats-url", server.url)
    assert done.returncode == 0, done.stderr
    assert ("bankaccount-aggregate: no daemon serves lattice 'default' as 'concordance'; workload "
            "bankaccount-bankaccount-aggregate not recorded as deployed (name its host with --host-id)") in done.stdout
    assert "undeployed 4 component(s) of bankaccount" in done.stdout
