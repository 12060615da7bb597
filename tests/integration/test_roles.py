"""A component may only do what its role allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from concordance_provider.build import build_component

from .harness import (
    client,
    daemon,
    events,
    events_of_stream,
    eventually,
    kv_json,
    nats_server,
    result,
    send,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "examples" / "bankaccount" / "build"
TEST_BUILD = ROOT / "tests" / "components" / "build"

MANIFEST = """\
apiVersion: core.oam.dev/v1beta1
kind: Application
metadata: {name: roles}
spec:
  components:
    - name: bank
      type: component
      properties: {image: "file://%(build)s/bankaccount_aggregate.wasm"}
      traits:
        - type: link
          properties:
            target: concordance
            values: {ROLE: aggregate, NAME: bankaccount, INTEREST: bankaccount}
    - name: gateway-as-projector
      type: component
      properties: {image: "file://%(build)s/otherbank_gateway.wasm"}
      traits:
        - type: link
          properties:
            target: concordance
            values: {ROLE: projector, NAME: sneaky, INTEREST: wire_transfer_initiated, MAX_DELIVERIES: "1"}
"""


FORGER = """\
    - name: forger
      type: component
      properties: {image: "file://%(forger)s"}
      traits:
        - type: link
          properties:
            target: concordance
            values: {ROLE: notifier, NAME: forger, INTEREST: account_created, MAX_DELIVERIES: "1"}
"""


async def test_a_notifier_cannot_publish_into_an_aggregate_stream(example_components, tmp_path):
    forger = TEST_BUILD / "publisher.wasm"
    build_component(ROOT / "tests" / "components" / "publisher", "stateless-handler", forger)
    manifest = tmp_path / "app.yaml"
    manifest.write_text(MANIFEST.split("    - name: gateway-as-projector")[0] % {"build": BUILD}
                        + FORGER % {"forger": forger})
    with nats_server(tmp_path) as server, daemon(manifest, tmp_path / "d.log", "--nats-url", server.url):
        async with client(server.url) as nc:
            await result(nc, await send(nc, "bankaccount", {"command_type": "create_account", "key": "F1",
                         "data": {"accountNumber": "F1", "initialBalance": 5, "customerId": "C"}}))

            async def reasons() -> list[str]:
                return [d["reason"] for d in await events_of_stream(nc, "CC_DEADLETTER", "cc.deadletter.NOTIFIER_forger")]

            found = await eventually(reasons, bool, timeout=30)
            assert "stream 'bankaccount' belongs to an aggregate" in found[0]
            assert [s for s, _ in await events(nc, "cc.events.funds_deposited.>")] == []
            assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.F1"))["balance"] == 5


async def test_a_projector_cannot_publish_events(example_components, tmp_path):
    manifest = tmp_path / "app.yaml"
    manifest.write_text(MANIFEST % {"build": BUILD})
    with nats_server(tmp_path) as server, daemon(manifest, tmp_path / "d.log", "--nats-url", server.url):
        async with client(server.url) as nc:
            await result(nc, await send(nc, "bankaccount", {"command_type": "create_account", "key": "R1",
                         "data": {"accountNumber": "R1", "initialBalance": 500, "customerId": "C"}}))
            await result(nc, await send(nc, "bankaccount", {"command_type": "wire_funds", "key": "R1", "data": {
                "accountNumber": "R1", "amount": 10, "customerId": "C", "wireTransactionId": "W1",
                "targetRoutingNumber": "123456789", "targetAccountNumber": "X"}}))

            async def reasons() -> list[str]:
                return [d["reason"] for d in await events_of_stream(nc, "CC_DEADLETTER", "cc.deadletter.PROJ_sneaky")]

            found = await eventually(reasons, bool, timeout=30)
            assert len(found) == 1 and "a projector may not publish events" in found[0]
            assert [s for s, _ in await events(nc) if ".interbank." in s] == []
