"""Health tells the truth about a daemon whose component host stops answering mid-call."""

from __future__ import annotations

import asyncio
import json

import msgpack
import pytest

from .harness import client, daemon, eventually, nats_server, result, send

pytestmark = pytest.mark.integration

RPC = "wasmbus.rpc.default.concordance"


async def test_a_consumer_stuck_on_a_silent_host_is_unhealthy_until_it_answers(tmp_path):
    with nats_server(tmp_path) as server, daemon(None, tmp_path / "daemon.log", "--nats-url", server.url,
                                                 "--stuck-after", "2"):
        async with client(server.url) as nc:
            held: asyncio.Queue = asyncio.Queue()
            # A host that takes the call and never answers: a real NATS peer on the dispatch subject.
            await nc.subscribe("cc.dispatch.default.silent", queue="host", cb=held.put)

            async def health() -> dict:
                return json.loads((await nc.request(f"{RPC}.health", b"", timeout=5)).data)

            link = {"source_id": "silent", "target": "concordance", "source_config": {
                "ROLE": "aggregate", "NAME": "quietbank", "INTEREST": "quietbank", "CALL_TIMEOUT_MS": "60000"}}
            reply = json.loads((await nc.request(f"{RPC}.linkdefs.put", json.dumps(link).encode(), timeout=10)).data)
            assert reply["accepted"] is True
            assert await health() == {"healthy": True, "message": None}

            seq = await send(nc, "quietbank", {"command_type": "open", "key": "Q1", "data": {}})
            call = await asyncio.wait_for(held.get(), 30)
            assert msgpack.unpackb(call.data)["call"] == "handle-command"
            unhealthy = await eventually(health, lambda h: not h["healthy"], timeout=15)
            assert unhealthy == {"healthy": False, "message": "consumer(s) stuck: AGG_CMD_quietbank"}
            status = json.loads((await nc.request("cc.status", b"", timeout=10)).data)
            assert {c["name"]: c.get("stuck") for c in status["consumers"]}["AGG_CMD_quietbank"] is True

            await call.respond(msgpack.packb({"v": 1, "err": "the bank is closed"}))
            outcome = await result(nc, seq)
            assert outcome["status"] == "rejected" and outcome["error"] == "the bank is closed"
            assert (await eventually(health, lambda h: h["healthy"], timeout=15))["healthy"] is True
