"""The bank example with its components hosted by a real wasmCloud 2 host (`wash host`).

The stack, all on loopback and all started here: nats-server, Debian's docker-registry, `wash
host`, the daemon (`concordance up` with no manifest) and `concordance deploy --watch`, which
builds the example's unchanged sources for the messaging-handler world, pushes them, starts them
as workloads and links them to the daemon.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from concordance_provider.store.results import read_result

from .harness import client, daemon, eventually, kv_json, ledger, logged, nats_server, result, send
from .lattice_stack import Deployment, WashHost, registry
from .test_bankaccount import _account, _original, _projected_balance, _sorted_types, _wire

pytestmark = pytest.mark.integration

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "app.yaml"


@pytest.fixture(scope="module")
def lattice(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lattice")
    with nats_server(tmp) as server, registry(tmp / "registry") as registry_address:
        stack = {"url": server.url, "host": WashHost(server.url, tmp / "wash"), "tmp": tmp, "registry": registry_address}
        try:
            with daemon(None, tmp / "daemon.log", "--nats-url", server.url, "--lattice", "default") as process:
                stack["daemon"] = process
                deployment = Deployment(MANIFEST, registry_address, server.url, stack["host"].host_id,
                                        tmp / "deploy.log")
                try:
                    yield stack
                finally:
                    deployment.stop()
        finally:
            stack["host"].stop()  # the one running now: a test may have replaced the first


async def test_original_scenario_ends_at_6000_on_a_wasmcloud_host(lattice):
    async with client(lattice["url"]) as nc:
        seqs = [await send(nc, "bankaccount", _original(name)) for name in
                ("create_account_cmd", "deposit_cmd_1", "deposit_cmd_2", "withdraw_cmd_1")]
        outcomes = [await result(nc, seq, timeout=120) for seq in seqs]
        assert [o["status"] for o in outcomes] == ["accepted"] * 4
        assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.ABC123"))["balance"] == 6000
        assert await eventually(lambda: _projected_balance(nc, "ABC123"), 6000, timeout=60) == 6000
        assert len(await ledger(nc, "ABC123")) == 4
        status = json.loads((await nc.request("cc.status", b"", timeout=10)).data)
        runs = {c["name"]: c["runs"] for c in status["components"]}
        assert runs["bankaccount-aggregate"] == "nats:cc.dispatch.default.bankaccount-aggregate"


SCRATCH = """\
apiVersion: core.oam.dev/v1beta1
kind: Application
metadata: {name: scratch, annotations: {}}
spec:
  components:
    - name: scratch-projector
      type: component
      properties: {image: %(image)s}
      traits:
        - type: link
          properties:
            namespace: concordance
            package: eventsourcing
            interfaces: [stateless-handler]
            target:
              name: concordance
              config: [{name: scratch-link, properties: {ROLE: projector, NAME: scratch_projector, INTEREST: account_created}}]
"""


async def _scratch_balance(nc):
    balance = await kv_json(nc, "CC_RM_scratch_projector", "balance.SCRATCH1")
    return balance and balance["balance"]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done


async def test_an_oci_image_is_deployed_shown_in_status_and_undeployed(lattice, tmp_path):
    url, host = lattice["url"], lattice["host"].host_id
    async with client(url) as nc:
        bank = await kv_json(nc, "CC_DEPLOYED", "bankaccount.bankaccount-projector")
        assert bank["host_id"] == host and bank["workload_id"] == "bankaccount-bankaccount-projector"
        # the image deploy pushed for the bank, named as a wasmCloud user names an image; no source
        manifest = tmp_path / "scratch.yaml"
        manifest.write_text(SCRATCH % {"image": bank["image"]})
        # no --host-id: the first heard from; --watch: it ends once the application is undeployed
        watching = Deployment(manifest, lattice["registry"], url, None, tmp_path / "scratch-deploy.log")
        try:
            output = watching.log_path.read_text()
            assert "waiting for a wasmCloud host's heartbeat" in output and "host found" in output
            assert "component runs its image as written" in output
            assert "starting workload; the host pulls and compiles its image" in output
            assert f"deployed 1 component(s) on host {host}" in output
            seq = await send(nc, "bankaccount", _account("SCRATCH1", 70))
            assert (await result(nc, seq, timeout=120))["status"] == "accepted"
            # projected by the new workload
            assert await eventually(lambda: _scratch_balance(nc), 70, timeout=120) == 70

            status = _cli("status", "--nats-url", url).stdout
            for workload, component in [("bankaccount-bankaccount-aggregate", "bankaccount bankaccount-aggregate"),
                                        ("scratch-scratch-projector", "scratch scratch-projector")]:
                assert f"  workload {workload} ({component}): running on host {host}" in status, status
            as_json = json.loads(_cli("status", "--json", "--nats-url", url).stdout)
            runs = {c["name"]: c for c in as_json[0]["components"]}
            assert runs["scratch-projector"]["workload"]["state"] == "running"

            undeployed = _cli("undeploy", str(manifest), "--nats-url", url).stdout
            assert (f"scratch-projector: unlinked; workload scratch-scratch-projector stopped on host {host}"
                    in undeployed)
            state = json.loads((await nc.request(f"runtime.host.{host}.workload.status",
                                                 b'{"workloadId": "scratch-scratch-projector"}', timeout=10)).data)
            assert state["workloadStatus"]["workloadState"] == "WORKLOAD_STATE_NOT_FOUND"
            assert await kv_json(nc, "CC_DEPLOYED", "scratch.scratch-projector") is None
            report = json.loads((await nc.request("cc.status", b"", timeout=10)).data)
            assert "scratch-projector" not in {c["name"] for c in report["components"]}
            status = _cli("status", "--nats-url", url).stdout
            assert "scratch-scratch-projector" not in status
            assert "  workload bankaccount-bankaccount-aggregate (bankaccount bankaccount-aggregate): running" in status
            assert watching.process.wait(timeout=40) == 0  # at the host's next heartbeat, every 15 s
            assert "the application was undeployed; the watch ends" in watching.log_path.read_text()
        finally:
            watching.stop()


async def test_wire_transfer_through_the_process_manager_on_a_wasmcloud_host(lattice):
    async with client(lattice["url"]) as nc:
        await result(nc, await send(nc, "bankaccount", _account("LWIRE", 5000, minimum=100)), timeout=120)
        await _wire(nc, "LWIRE", "LWT-OK", 1200, "123456789")
        final = ["wire_transfer_initiated", "funds_reserved", "wire_transfer_succeeded", "funds_committed"]
        assert await eventually(lambda: _sorted_types(nc, "LWT-OK"), sorted(final), timeout=120) == sorted(final)
        state = await kv_json(nc, "CC_STATE", "agg.bankaccount.LWIRE")
        assert state["balance"] == 3800 and state["reservedFunds"] == {}
        assert await eventually(lambda: _projected_balance(nc, "LWIRE"), 3800, timeout=60) == 3800


async def test_killing_the_host_mid_run_loses_nothing(lattice):
    accounts = [f"K{i}" for i in range(4)]
    deposits = 12
    async with client(lattice["url"]) as nc:
        for account in accounts:
            assert (await result(nc, await send(nc, "bankaccount", _account(account, 0)), timeout=120))["status"] == "accepted"
        unavailable = "component unavailable; will retry"
        seen_before = sum(e.get("event") == unavailable for e in lattice["daemon"].logs())
        seqs = []
        for n in range(deposits):
            for account in accounts:
                seqs.append(await send(nc, "bankaccount", {"command_type": "deposit_funds", "key": account, "data": {
                    "accountNumber": account, "amount": n + 1, "customerId": "C1"}}))
            if n == 2:
                lattice["host"].kill()  # with commands queued and in flight
        killed_at = time.monotonic()
        # the daemon finds no host to call; the commands wait, none is decided or lost meanwhile
        await logged(lattice["daemon"], unavailable, count=seen_before + 1, timeout=120)
        assert await read_result(nc, seqs[-1]) is None
        lattice["host"] = WashHost(lattice["url"], lattice["tmp"] / "wash", name="restarted")
        outcomes = [await result(nc, seq, timeout=240) for seq in seqs]
        assert [o["status"] for o in outcomes] == ["accepted"] * len(seqs)
        expected = sum(range(1, deposits + 1))
        for account in accounts:
            assert (await kv_json(nc, "CC_STATE", f"agg.bankaccount.{account}"))["balance"] == expected
            assert await eventually(lambda: _projected_balance(nc, account), expected, timeout=180) == expected
            assert len(await ledger(nc, account)) == deposits + 1  # each event applied exactly once
        print(f"recovered {time.monotonic() - killed_at:.1f}s after the kill")
