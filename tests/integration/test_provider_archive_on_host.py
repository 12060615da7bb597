"""The provider archive's executable, run by a wasmCloud 1.x host (v1.9.2 and v1.0.0) as the host
runs any provider: no arguments, an empty environment, HostData on stdin, then SIGKILL after stop."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import nats
import pytest

from concordance_provider.provider_archive import read_archive_file

from .harness import client, eventually, kv_json, nats_server, result, send
from .wasmcloud1_host import SHUTDOWN_DELAY, V1_0_0, V1_9_2, Link, WasmCloud1Host, server_nkey

pytestmark = pytest.mark.integration

COMMANDS = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "commands"


@pytest.fixture(scope="module")
def executable(tmp_path_factory) -> Path:
    """The x86_64-linux binary of an archive built by the CLI, where a host puts it (mode 0755)."""
    folder = tmp_path_factory.mktemp("par-host")
    done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "provider-archive", "-o",
                           str(folder / "concordance.par.gz")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    path = folder / "wasmcloudcache" / "concordance_0_1_0"
    path.parent.mkdir()
    path.write_bytes(read_archive_file(folder / "concordance.par.gz").binaries["x86_64-linux"])
    path.chmod(0o755)
    return path


def _links(provider_key: str) -> tuple[Link, Link]:
    aggregate = Link("bankaccount-aggregate", provider_key, target_config={
        "ROLE": "aggregate", "INTEREST": "bankaccount", "NAME": "bankaccount", "KEY": "accountNumber",
        "COMPONENT_FILE": "bankaccount_aggregate.wasm"})
    projector = Link("bankaccount-projector", provider_key, interfaces=("stateless-handler",), target_config={
        "ROLE": "projector", "NAME": "bankaccount_projector", "COMPONENT_FILE": "bankaccount_projector.wasm",
        "INTEREST": "account_created,funds_deposited,funds_withdrawn"})
    return aggregate, projector


async def _projected(nc):
    try:
        doc = await kv_json(nc, "CC_RM_bankaccount_projector", "balance.ABC123")
    except nats.js.errors.BucketNotFoundError:  # the projector is still starting
        return None
    return doc and doc["balance"]


@pytest.mark.parametrize("version", [V1_9_2, V1_0_0], ids=lambda v: v.name)
async def test_a_wasmcloud_1_host_runs_the_archive(version, executable, example_components, tmp_path):
    config = {"COMPONENT_DIR": str(example_components["bankaccount_aggregate"].parent)}
    with nats_server(tmp_path) as server:
        host = WasmCloud1Host(version, server.url, f"par{uuid.uuid4().hex[:6]}", "concordance", config,
                              tmp_path / "provider.log", structured_logging=version.xkeys)
        aggregate, projector = _links(host.provider_key)
        host.links = [aggregate]  # in HostData
        host.start([str(executable)], env={})
        try:
            async with client(server.url) as nc:
                host.check_health_on_schedule(nc)
                await host.wait_serving(nc)
                await host.put_link(nc, projector)
                seqs = [await send(nc, "bankaccount", json.loads((COMMANDS / f"{name}.json").read_text()))
                        for name in ("create_account_cmd", "deposit_cmd_1", "deposit_cmd_2", "withdraw_cmd_1")]
                assert [(await result(nc, seq))["status"] for seq in seqs] == ["accepted"] * 4
                assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.ABC123"))["balance"] == 6000
                assert await eventually(lambda: _projected(nc), 6000) == 6000

                await host.health_checked(1)  # the host's first check, 5 s after start
                assert host.health_answers[0] == {"healthy": True, "message": None}
                answer, _ = await host.shutdown_request(nc, host_id=server_nkey())  # another host's stop
                assert answer is None and host.alive()
                answer, took = await host.stop_provider(nc)  # its own: answered in time, then SIGKILL
                assert answer is not None and took < SHUTDOWN_DELAY, (answer, took)
                assert not host.alive()
        finally:
            await host.stop_health()
            host.kill()
    assert "Traceback" not in host.log_text()
