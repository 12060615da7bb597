"""`concordance up --stateless-process`: the aggregates in the first process, projectors, notifiers and
process managers in a second, and the two stopping together."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from concordance_provider.nats_server import free_port
from concordance_provider.stateless_process import NICER_BY

from .harness import DaemonProcess, client, eventually, kv_json, logged, result, send

pytestmark = pytest.mark.integration

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "app.yaml"
STOPS_WITHIN = 10.0  # seconds


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_ended(pid: int, within: float = STOPS_WITHIN) -> float:
    started = time.monotonic()
    while _running(pid):
        assert time.monotonic() - started < within, f"process {pid} still runs after {within:.0f}s"
        time.sleep(0.05)
    return time.monotonic() - started


async def _start(tmp_path: Path, name: str) -> tuple[DaemonProcess, int, str]:
    """The daemon with --stateless-process on its own NATS; its second process's PID, and the URL."""
    port = free_port()
    first = DaemonProcess(MANIFEST, tmp_path / f"{name}.log", "--stateless-process",
                          "--state-dir", str(tmp_path / f"{name}-state"), "--port", str(port))
    first.wait_ready()
    started = await logged(first, "stateless handlers started in a second process")
    await logged(first, "concordance ready", count=2)  # both processes
    return first, int(started[0]["pid"]), f"nats://127.0.0.1:{port}"


async def test_each_process_runs_its_roles_and_the_projection_follows_the_commands(example_components, tmp_path):
    first, second, url = await _start(tmp_path, "split")
    try:
        ready = {tuple(entry["components"]) for entry in first.logs() if entry.get("event") == "concordance ready"}
        assert ready == {("bankaccount-aggregate",),
                         ("bankaccount-projector", "wiretransfer-process-manager", "otherbank-gateway")}
        async with client(url) as nc:
            create = {"command_type": "create_account", "key": "SPLIT",
                      "data": {"accountNumber": "SPLIT", "initialBalance": 100, "customerId": "C"}}
            assert (await result(nc, await send(nc, "bankaccount", create)))["status"] == "accepted"
            for amount in (10, 20, 30):
                deposit = {"command_type": "deposit_funds", "key": "SPLIT",
                           "data": {"accountNumber": "SPLIT", "amount": amount, "customerId": "C"}}
                assert (await result(nc, await send(nc, "bankaccount", deposit)))["status"] == "accepted"
            assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.SPLIT"))["balance"] == 160
            balance = await eventually(lambda: kv_json(nc, "CC_RM_bankaccount_projector", "balance.SPLIT"),
                                       lambda value: value is not None and value.get("balance") == 160)
            assert balance["balance"] == 160
        status = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "status", "--json",
                                 "--nats-url", url], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        daemons = {entry["pid"]: [c["name"] for c in entry["components"]] for entry in json.loads(status.stdout)}
        assert daemons == {first.process.pid: ["bankaccount-aggregate"],
                           second: ["bankaccount-projector", "wiretransfer-process-manager", "otherbank-gateway"]}
        # commands come first: the second process yields the CPU to the first on a busy machine
        assert _niceness(second) == _niceness(first.process.pid) + NICER_BY
        assert first.stop() == 0
        _wait_ended(second)
    finally:
        first.stop()


def _niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


async def test_the_second_process_stops_by_itself_when_the_first_is_killed(example_components, tmp_path):
    first, second, _url = await _start(tmp_path, "killed")
    try:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        seconds = _wait_ended(second)
        print(f"second process ended {seconds:.2f}s after the first was killed")
    finally:
        first.stop()


async def test_the_first_process_stops_saying_so_when_the_second_ends(example_components, tmp_path):
    first, second, _url = await _start(tmp_path, "second-killed")
    try:
        subprocess.run(["kill", "-9", str(second)], check=True)
        assert first.process.wait(STOPS_WITHIN) == 2
        assert "the stateless process (projectors, notifiers, process managers) exited with code -9" \
            in first.log_path.read_text()
    finally:
        first.stop()


@pytest.mark.parametrize("args, error", [
    (["--roles", "aggregate", "--stateless-process"], "--roles and --stateless-process do not go together"),
    (["--roles", "aggregate,teller"], "--roles: unknown role 'teller'"),
    (["--roles", ","], "--roles: no role named"),
    (["--stateless-process", "--lattice", "default"], "--stateless-process needs a manifest and no --lattice"),
])
def test_options_that_do_not_go_together_are_refused_at_once(tmp_path, args, error):
    done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "up", str(MANIFEST), *args,
                           "--nats-url", "nats://127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert error in done.stderr
