"""The records of deployed workloads (KV CC_DEPLOYED), as `deploy --watch`, `undeploy` and `status` read them."""

from __future__ import annotations

import pytest

from concordance_provider.deployed import DeployedWorkload, deployed, forget, record

from .harness import client, nats_server

pytestmark = pytest.mark.integration


def _workload(application: str, component: str) -> DeployedWorkload:
    return DeployedWorkload(application=application, component=component, workload_id=f"w-{component}",
                            host_id="H", image="127.0.0.1:5000/x:1", dispatch_subject=f"cc.dispatch.default.{component}",
                            lattice="default", provider_id="concordance")


async def test_every_record_is_read_every_time_and_a_forgotten_one_never(tmp_path):
    with nats_server(tmp_path) as server:
        async with client(server.url) as nc:
            js = nc.jetstream()
            assert await deployed(js) == []
            for application, component in (("bank", "agg"), ("bank", "proj"), ("other", "agg")):
                await record(js, _workload(application, component))
            await forget(js, "bank", "proj")
            for _ in range(100):  # nats-py's KeyValue.keys() missed every key now and then
                assert [(w.application, w.component) for w in await deployed(js)] == [("bank", "agg"), ("other", "agg")]
                assert [w.component for w in await deployed(js, "bank")] == ["agg"]
