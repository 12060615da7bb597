"""What `concordance deploy` would start and link, decided from the manifest before anything runs."""

from __future__ import annotations

import asyncio
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from concordance_provider import deploy
from concordance_provider.deploy import DeployError, placements
from concordance_provider.manifest import load_manifest

APP = """\
apiVersion: core.oam.dev/v1beta1
kind: Application
metadata: {name: shop, annotations: {}}
spec:
  components:
    - name: orders
      type: component
      properties: {image: %(image)s}
      traits:
        - type: link
          properties:
            namespace: concordance
            package: eventsourcing
            interfaces: [aggregate]
            target:
              name: concordance
              config: [{name: orders-link, properties: {ROLE: aggregate, NAME: orders, INTEREST: orders}}]
"""


def _manifest(tmp_path: Path, image: str, name: str = "shop"):
    path = tmp_path / "app.yaml"
    path.write_text(textwrap.dedent(APP % {"image": image}).replace("name: shop", f"name: {name}"))
    return load_manifest(path, need_files=False)


def test_an_oci_image_without_source_is_run_as_written_and_nothing_is_built(tmp_path):
    placement, = placements(_manifest(tmp_path, "ghcr.io/shop/orders:1.2.0"), tmp_path / "build", None, False, "prod")
    assert placement.image == "ghcr.io/shop/orders:1.2.0" and not (tmp_path / "build").exists()
    assert placement.workload_id == "shop-orders" and placement.dispatch_subject == "cc.dispatch.prod.orders"
    request = placement.start_request()["workload"]["witWorld"]["components"][0]
    assert request["image"] == "ghcr.io/shop/orders:1.2.0"
    assert request["localResources"]["config"]["subscriptions"] == "cc.dispatch.prod.orders"


def test_the_link_carries_its_values_as_target_config(tmp_path):
    placement, = placements(_manifest(tmp_path, "oci://ghcr.io/shop/orders:1.2.0"), tmp_path, None, False, "prod")
    link = placement.link_definition("concordance")
    assert link["target"] == "concordance" and link["source_id"] == "orders" and link["source_config"] == {}
    assert link["target_config"] == {"ROLE": "aggregate", "NAME": "orders", "INTEREST": "orders",
                                     "DISPATCH_SUBJECT": "cc.dispatch.prod.orders"}


def test_a_local_file_alone_is_named_as_unpullable(tmp_path):
    with pytest.raises(DeployError, match="component 'orders' has nothing a wasmCloud host can pull"):
        placements(_manifest(tmp_path, "file://./orders.wasm"), tmp_path, "127.0.0.1:5001", True, "prod")


def test_a_source_needs_a_registry(tmp_path):
    manifest = _manifest(tmp_path, "ghcr.io/shop/orders:1.2.0")
    manifest.components[0].source = tmp_path
    with pytest.raises(DeployError, match="'orders' is built from its source and pushed: give --registry"):
        placements(manifest, tmp_path, None, False, "prod")


def test_a_name_that_cannot_key_the_record_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(DeployError, match="application 'my shop'.*cannot name a deployed workload"):
        placements(_manifest(tmp_path, "ghcr.io/shop/orders:1", name="'my shop'"), tmp_path, None, False, "prod")


def test_a_watch_told_to_stop_while_it_starts_workloads_stops_at_once(monkeypatch):
    # starting a workload can take minutes (up to 120 s each): Ctrl-C must not wait for it
    placing = asyncio.Event()
    heartbeats = [SimpleNamespace(subject="runtime.operator.heartbeat.NEWHOST")]

    class Subscription:
        async def next_msg(self, timeout: float) -> SimpleNamespace:
            if heartbeats:
                return heartbeats.pop()
            await asyncio.sleep(timeout)
            raise asyncio.TimeoutError

        async def unsubscribe(self) -> None:
            pass

    class Connection:
        async def subscribe(self, subject: str) -> Subscription:
            return Subscription()

    async def still_deployed(nc, placements):
        return placements

    async def host_alive(nc, host_id):
        return False

    async def place(nc, host_id, placements, lattice, provider_id):
        placing.set()
        await asyncio.sleep(120)

    monkeypatch.setattr(deploy, "_still_deployed", still_deployed)
    monkeypatch.setattr(deploy, "host_alive", host_alive)
    monkeypatch.setattr(deploy, "place", place)

    async def scenario() -> float:
        stopping = asyncio.Event()
        watching = asyncio.create_task(deploy.watch(Connection(), "GONEHOST", [object()], "default", "p", stopping))
        await asyncio.wait_for(placing.wait(), 5)
        started = time.monotonic()
        stopping.set()
        await asyncio.wait_for(watching, 5)
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 1.0
