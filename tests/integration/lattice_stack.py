"""The wasmCloud 2 side of the stack on loopback: Debian's docker-registry and `wash host`,
each started here and stopped by its PID."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from concordance_provider.nats_server import free_port

REGISTRY_BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
WASH = str(Path(sys.executable).parent / "wash")
HOST_ID = re.compile(r'Host started host_id="([^"]+)"')


def _wait(check, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not ready in {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def registry(folder: Path) -> Iterator[str]:
    """An OCI registry on a free loopback port; yields its address (host:port). Skips the test,
    saying why, where docker-registry is not installed."""
    if not Path(REGISTRY_BINARY).is_file():
        pytest.skip("docker-registry is not installed, and the wasmCloud-host tests push components to it: "
                    "`make registry` installs Debian's with apt-get (as root)")
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "registry.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    log = folder / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        _wait(lambda: _answers(f"http://127.0.0.1:{port}/v2/"), 30, "docker-registry", log)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(process)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


class WashHost:
    """`wash host` on loopback, its OCI cache kept across restarts as a real host's would be."""

    def __init__(self, nats_url: str, folder: Path, name: str = "host") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / f"{name}-{time.monotonic_ns()}.log"
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [WASH, "host", "--scheduler-nats-url", nats_url, "--data-nats-url", nats_url,
                 "--http-addr", f"127.0.0.1:{free_port()}", "--allow-insecure-registries",
                 "--oci-cache-dir", str(folder / "oci-cache"), "--non-interactive"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "NO_COLOR": "1"})
        self.host_id = ""
        _wait(self._started, 60, "wash host", self.log_path)

    def _started(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"wash host exited:\n{self.log_path.read_text()[-3000:]}")
        found = HOST_ID.search(self.log_path.read_text(errors="replace"))
        if found:
            self.host_id = found.group(1)
        return bool(found)

    def kill(self) -> None:
        """As a crash would: SIGKILL, no goodbye."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        _stop(self.process)


class Deployment:
    """`concordance deploy --watch`, as a user leaves it running beside the hosts."""

    def __init__(self, manifest: Path, registry_address: str, nats_url: str, host_id: str | None,
                 log_path: Path) -> None:
        """``host_id`` None: on the first host heard from."""
        self.log_path = log_path
        with log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "concordance_provider.cli", "deploy", str(manifest), "--registry",
                 registry_address, "--nats-url", nats_url, *(["--host-id", host_id] if host_id else []), "--watch"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
        _wait(self._deployed, 600, "concordance deploy", log_path)

    def _deployed(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"deploy exited with {self.process.returncode}:\n{self.log_path.read_text()}")
        return " component(s) on host " in self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, as Ctrl-C: an idle watch ends within its 1 s poll. One still starting workloads
        on a new host finishes that first (up to 120 s a workload), so it is killed after 3 s:
        nothing here waits on what it would have done."""
        _stop(self.process, timeout=3.0)
