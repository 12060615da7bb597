"""A component may only do what its role allows."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import pytest

from concordance_provider.build import build_component

from .harness import (
    DaemonProcess,
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


WRITER = """\
apiVersion: core.oam.dev/v1beta1
kind: Application
metadata: {name: writer}
spec:
  components:
    - name: writer
      type: component
      properties: {image: "file://%(writer)s"}
      traits:
        - type: link
          properties:
            target: concordance
            values: {ROLE: %(role)s, NAME: writer, INTEREST: note_taken, MAX_DELIVERIES: "2"}
"""


def _note(number: int, keys: list[str]) -> bytes:
    return json.dumps({"specversion": "1.0", "id": f"note-{number}", "type": "note_taken", "source": "test",
                       "time": "2026-01-01T00:00:00Z", "x-concordance-stream": "notes",
                       "data": {"keys": keys}}).encode()


BAD_KEYS = ["notes.has space", "notes.*", "notes..empty", "_cc.checkpoint.PROJ_writer"]


WRITERS = [("projector", "PROJ_writer"), ("notifier", "NOTIFIER_writer")]


@dataclass
class WriterCase:
    url: str
    process: DaemonProcess
    bad: dict[int, str]  # the event's CC_EVENTS sequence -> the invalid key it writes
    after: int  # the sequence of the good event published after the bad ones


@pytest.fixture(scope="module")
async def writers(tmp_path_factory) -> AsyncIterator[dict[str, WriterCase]]:
    """The projector's case and the notifier's, each on its own nats-server with its own daemon,
    started together and sent their events at once: the retries, most of each case's time, run
    side by side."""
    writer = TEST_BUILD / "writer.wasm"
    build_component(ROOT / "tests" / "components" / "writer", "stateless-handler", writer)
    cases = {}
    with ExitStack() as running:
        for role, _ in WRITERS:
            tmp = tmp_path_factory.mktemp(role)
            manifest = tmp / "app.yaml"
            manifest.write_text(WRITER % {"writer": writer, "role": role})
            server = running.enter_context(nats_server(tmp))
            process = running.enter_context(daemon(manifest, tmp / "d.log", "--nats-url", server.url))
            async with client(server.url) as nc:
                js = nc.jetstream()
                await js.publish("cc.events.note_taken.notes.N0", _note(0, ["notes.first"]))
                bad = {(await js.publish(f"cc.events.note_taken.notes.B{n}", _note(n, [f"notes.valid{n}", key]))).seq:
                       key for n, key in enumerate(BAD_KEYS)}
                after = await js.publish("cc.events.note_taken.notes.N9", _note(9, ["notes.last"]))
            cases[role] = WriterCase(server.url, process, bad, after.seq)
        yield cases


@pytest.mark.parametrize("role, consumer", WRITERS)
async def test_a_handler_writing_an_invalid_read_model_key_is_retried_then_dead_lettered(writers, role, consumer):
    case = writers[role]
    async with client(case.url) as nc:
        js = nc.jetstream()

        async def letters() -> list[dict]:
            return await events_of_stream(nc, "CC_DEADLETTER", f"cc.deadletter.{consumer}")

        # the last bad event's retries wait the longest: each hand-back behind a failing event counts
        # as a delivery, so its backoff reaches 30 s and more on a loaded machine
        found = await eventually(letters, lambda found: len(found) == len(BAD_KEYS), timeout=180)
        # each retried once, then dead, with a reason that names the key; the server's delivery
        # count also holds hand-backs of events waiting behind a failing one in their batch
        assert {d["stream_seq"]: d["reason"] for d in found} == {
            seq: f"handler wrote read-model keys that are not valid KV keys: [{key!r}] (after 2 attempts)"
            for seq, key in case.bad.items()}
        assert all(d["deliveries"] >= 2 for d in found)
        checkpoint = lambda: kv_json(nc, "CC_RM_writer", f"_cc.checkpoint.{consumer}")  # noqa: E731
        assert await eventually(checkpoint, case.after) == case.after  # the handler went on
        written = await js.stream_info("KV_CC_RM_writer", subjects_filter="$KV.CC_RM_writer.notes.>")
        # the events before and after are applied; nothing of a bad one, not even its valid key
        assert sorted(written.state.subjects or {}) == ["$KV.CC_RM_writer.notes.first", "$KV.CC_RM_writer.notes.last"]
    assert case.process.process.poll() is None
