"""Calls to components on a wasmCloud host, against real NATS peers that answer (or not) as a host
would: health while a host is silent, hung calls, absent hosts, and the one-call fold."""

from __future__ import annotations

import asyncio
import json

import msgpack
import pytest

from concordance_provider.store.results import read_result

from .harness import client, daemon, eventually, kv_json, nats_server, result, send

pytestmark = pytest.mark.integration

RPC = "wasmbus.rpc.default.concordance"


async def test_a_consumer_stuck_on_a_silent_host_is_unhealthy_until_it_answers(tmp_path):
    with nats_server(tmp_path) as server, daemon(None, tmp_path / "daemon.log", "--nats-url", server.url,
                                                 "--lattice", "default", "--stuck-after", "2"):
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
            assert msgpack.unpackb(call.data)["call"] == "decide"
            unhealthy = await eventually(health, lambda h: not h["healthy"], timeout=15)
            assert unhealthy == {"healthy": False, "message": "consumer(s) stuck: AGG_CMD_quietbank"}
            status = json.loads((await nc.request("cc.status", b"", timeout=10)).data)
            assert {c["name"]: c.get("stuck") for c in status["consumers"]}["AGG_CMD_quietbank"] is True

            await call.respond(msgpack.packb({"v": 1, "err": "the bank is closed"}))
            outcome = await result(nc, seq)
            assert outcome["status"] == "rejected" and outcome["error"] == "the bank is closed"
            assert (await eventually(health, lambda h: h["healthy"], timeout=15))["healthy"] is True


async def _link(nc, source_id: str, name: str, **values: str) -> None:
    link = {"source_id": source_id, "target": "concordance",
            "source_config": {"ROLE": "aggregate", "NAME": name, "INTEREST": name, **values}}
    reply = json.loads((await nc.request(f"{RPC}.linkdefs.put", json.dumps(link).encode(), timeout=10)).data)
    assert reply["accepted"] is True, reply


async def test_a_host_that_answers_pings_but_not_the_call_fails_the_call(tmp_path):
    """No reply in time while the component is there means the call trapped or hung: counted."""
    with nats_server(tmp_path) as server, daemon(None, tmp_path / "daemon.log", "--nats-url", server.url,
                                                 "--lattice", "default"):
        async with client(server.url) as nc:
            async def host(msg) -> None:
                if msgpack.unpackb(msg.data)["call"] == "ping":
                    await msg.respond(msgpack.packb({"v": 1, "ok": None, "puts": {}}))

            await nc.subscribe("cc.dispatch.default.hanging", queue="host", cb=host)
            await _link(nc, "hanging", "hangbank", CALL_TIMEOUT_MS="300", MAX_DELIVERIES="2")
            outcome = await result(nc, await send(nc, "hangbank", {"command_type": "open", "key": "H1", "data": {}}))
            assert outcome["status"] == "rejected"
            assert "gave no answer within 300 ms" in outcome["error"] and "after 2 attempts" in outcome["error"]


async def test_commands_wait_while_no_host_serves_and_complete_when_one_does(tmp_path):
    with nats_server(tmp_path) as server, daemon(None, tmp_path / "daemon.log", "--nats-url", server.url,
                                                 "--lattice", "default"):
        async with client(server.url) as nc:
            await _link(nc, "late", "latebank", CALL_TIMEOUT_MS="300", MAX_DELIVERIES="1")
            seq = await send(nc, "latebank", {"command_type": "open", "key": "L1", "data": {}})
            info = await eventually(lambda: nc.jetstream().consumer_info("CC_COMMANDS", "AGG_CMD_latebank"),
                                    lambda i: i.delivered.consumer_seq >= 3, timeout=30)
            assert info.delivered.consumer_seq >= 3  # tried three times and waiting, though MAX_DELIVERIES is 1
            assert (await nc.jetstream().stream_info("CC_DEADLETTER")).state.messages == 0
            assert await read_result(nc, seq) is None

            async def host(msg) -> None:
                request = msgpack.unpackb(msg.data)
                if request["call"] == "decide":
                    ok = {"events": [{"event_type": "opened", "stream": "latebank", "payload": "{}"}],
                          "folded": True, "state": json.dumps({"open": True})}
                else:
                    ok = {"state": json.dumps({"open": True})}
                await msg.respond(msgpack.packb({"v": 1, "ok": ok, "puts": {}}))

            await nc.subscribe("cc.dispatch.default.late", queue="host", cb=host)
            outcome = await result(nc, seq, timeout=90)
            assert outcome["status"] == "accepted" and outcome["events"] == ["opened"]


@pytest.mark.parametrize("payload, folded_by", [
    ('{"amount": 5}', "decide"),  # exactly what the daemon stores: the fold of the same call is used
    ('{"amount":5}', "apply-event"),  # stored re-serialised: the daemon folds what it stores itself
])
async def test_the_fold_of_the_deciding_call_is_used_only_for_the_events_stored(tmp_path, payload, folded_by):
    with nats_server(tmp_path) as server, daemon(None, tmp_path / "daemon.log", "--nats-url", server.url,
                                                 "--lattice", "default"):
        async with client(server.url) as nc:
            calls: list[str] = []

            async def host(msg) -> None:
                request = msgpack.unpackb(msg.data)
                calls.append(request["call"])
                if request["call"] == "decide":
                    ok = {"events": [{"event_type": "paid", "stream": "till", "payload": payload}],
                          "folded": True, "state": json.dumps({"folded_by": "decide"})}
                else:
                    ok = {"state": json.dumps({"folded_by": "apply-event"})}
                await msg.respond(msgpack.packb({"v": 1, "ok": ok, "puts": {}}))

            await nc.subscribe("cc.dispatch.default.till", queue="host", cb=host)
            await _link(nc, "till", "till")
            outcome = await result(nc, await send(nc, "till", {"command_type": "pay", "key": "T1", "data": {}}))
            assert outcome["status"] == "accepted"
            assert await kv_json(nc, "CC_STATE", "agg.till.T1") == {"folded_by": folded_by}
            assert calls == (["decide"] if folded_by == "decide" else ["decide", "apply-event"])
