"""How long CC_RESULTS keeps outcomes is a setting: given at start, changed at a restart, checked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .harness import client, daemon, example_manifest, nats_server, result, send

pytestmark = pytest.mark.integration


async def results_max_age(url: str) -> float:
    async with client(url) as nc:
        return (await nc.jetstream().stream_info("KV_CC_RESULTS")).config.max_age


async def test_the_outcome_retention_is_set_and_changed_by_results_ttl(example_components, tmp_path):
    manifest = example_manifest(tmp_path, {})
    with nats_server(tmp_path) as server:
        with daemon(manifest, tmp_path / "a.log", "--nats-url", server.url, "--results-ttl", "2h"):
            assert await results_max_age(server.url) == 7200
            async with client(server.url) as nc:
                seq = await send(nc, "bankaccount", {"command_type": "create_account", "key": "TTL1", "data": {
                    "accountNumber": "TTL1", "initialBalance": 1, "customerId": "C"}})
                assert (await result(nc, seq))["status"] == "accepted"
        with daemon(manifest, tmp_path / "b.log", "--nats-url", server.url, "--results-ttl", "30m") as restarted:
            assert await results_max_age(server.url) == 1800
            async with client(server.url) as nc:
                assert (await result(nc, seq))["status"] == "accepted", "outcomes kept across the change"
            assert any(e.get("event") == "bucket retention changed" for e in restarted.logs())


def test_a_malformed_results_ttl_is_refused_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "up", "--nats-url", "nats://127.0.0.1:1",
                           "--lattice", "default", "--results-ttl", "1w"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --results-ttl: '1w' is not a duration such as 90s, 15m, 12h or 7d"
