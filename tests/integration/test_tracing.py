"""A command's W3C trace context reaches its events, its outcome and the process manager's commands."""

from __future__ import annotations

import json

import pytest

from concordance_provider.store.jetstream import read_all
from concordance_provider.tracing import is_valid, trace_id

from .harness import client, daemon, eventually, example_manifest, kv_json, nats_server, result

pytestmark = pytest.mark.integration

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def send_traced(nc, body: dict, traceparent: str | None) -> int:
    headers = {"traceparent": traceparent} if traceparent else None
    reply = await nc.request("cc.commands.bankaccount", json.dumps(body).encode(), timeout=5, headers=headers)
    return int(json.loads(reply.data)["seq"])


async def test_one_business_transaction_is_followed_across_components(example_components, tmp_path):
    with nats_server(tmp_path) as server:
        with daemon(example_manifest(tmp_path, {}), tmp_path / "d.log", "--nats-url", server.url) as process:
            async with client(server.url) as nc:
                created = await send_traced(nc, {"command_type": "create_account", "key": "TR1", "data": {
                    "accountNumber": "TR1", "initialBalance": 1000, "customerId": "C"}}, None)
                made = (await result(nc, created))["traceparent"]
                assert is_valid(made), "a command without trace context gets one"

                wired = await send_traced(nc, {"command_type": "wire_funds", "key": "TR1", "data": {
                    "accountNumber": "TR1", "customerId": "C", "amount": 100, "wireTransactionId": "WTR1",
                    "targetRoutingNumber": "123456789", "targetAccountNumber": "EXT"}}, TRACE)
                outcome = await result(nc, wired)
                assert outcome["status"] == "accepted" and outcome["traceparent"] == TRACE

                await eventually(lambda: kv_json(nc, "CC_STATE", "agg.bankaccount.TR1"),
                                 lambda s: s is not None and s["balance"] == 900, timeout=60)
                events = {m.seq: m for m in await read_all(nc, "CC_EVENTS", "cc.events.*.bankaccount.TR1")}
                traced = [m for m in events.values() if m.headers.get("Concordance-Causation") == f"command:{wired}"]
                assert traced and all(trace_id(m.headers["traceparent"]) == trace_id(TRACE) for m in traced)
                assert all(m.headers["traceparent"] != TRACE for m in traced), "each hop has its own span"
                created_event = [m for m in events.values() if m.headers.get("Concordance-Causation") == f"command:{created}"]
                assert trace_id(created_event[0].headers["traceparent"]) == trace_id(made)

                # the process manager's reserve and commit continue the wire transfer's trace
                later = [await result(nc, seq) for seq in range(wired + 1, wired + 3)]
                assert sorted(o["command_type"] for o in later) == ["commit_funds", "reserve_funds"]
                assert all(trace_id(o["traceparent"]) == trace_id(TRACE) for o in later)
                # and so does the other bank's answer, whichever of it and the reservation comes last
                answers = await read_all(nc, "CC_EVENTS", "cc.events.*.interbank.>")
                assert answers and all(trace_id(m.headers["traceparent"]) == trace_id(TRACE) for m in answers)
        logged = [e for e in process.logs() if e.get("trace_id") == trace_id(TRACE)]
        assert logged, "log lines carry the trace id"
