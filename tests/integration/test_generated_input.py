"""Generated input thrown at a running daemon: every command gets one outcome, nothing crashes."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concordance_provider.store.results import read_result

from .harness import DaemonProcess, daemon, nats_server

pytestmark = pytest.mark.integration

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "app.yaml"
def slow(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

keys = st.one_of(st.text(max_size=12), st.sampled_from(["ABC123", "a.>", "*", ">", "", " ", "ok-key", "ü"]))
command_types = st.one_of(st.text(max_size=20), st.sampled_from(
    ["create_account", "DepositFunds", "withdraw-funds", "wire_funds", "reserve_funds", "commit_funds"]))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
raw_commands = st.one_of(
    st.fixed_dictionaries({}, optional={"command_type": command_types, "key": keys,
                                        "data": st.dictionaries(st.sampled_from(
                                            ["accountNumber", "amount", "customerId", "minBalance", "initialBalance",
                                             "wireTransactionId", "targetRoutingNumber"]), json_values)}),
    json_values,
).map(lambda doc: json.dumps(doc).encode()) | st.binary(max_size=64)


@pytest.fixture(scope="module")
def running(example_components, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generated")
    with nats_server(tmp) as server, daemon(MANIFEST, tmp / "d.log", "--nats-url", server.url) as process:
        yield server.url, process


async def _one_outcome(url: str, body: bytes) -> dict:
    nc = await nats.connect(url)
    try:
        ack = json.loads((await nc.request("cc.commands.bankaccount", body, timeout=5)).data)
        outcome = await read_result(nc, ack["seq"], wait=20)
        if outcome is None:
            raise AssertionError(f"no outcome for {body!r}")
        return json.loads(outcome)
    finally:
        await nc.close()


@slow(60)
@given(body=raw_commands)
def test_any_command_gets_exactly_one_clear_outcome(running, body):
    url, process = running
    outcome = asyncio.run(_one_outcome(url, body))
    assert outcome["status"] in ("accepted", "rejected")
    if outcome["status"] == "rejected":
        assert outcome["error"]
    assert process.process.poll() is None


link_values = st.dictionaries(
    st.sampled_from(["ROLE", "role", "NAME", "INTEREST", "KEY", "MAX_MESSAGES_PER_BATCH", "CALL_TIMEOUT_MS",
                     "MAX_DELIVERIES", "CONFIG_B64", "Other"]),
    st.one_of(st.text(max_size=16), st.sampled_from(
        ["aggregate", "projector", "process_manager", "notifier", "bankaccount", "0", "-3", "abc",
         '{"start": "a", "advance": ["b"]}', '{"start": 1}', "a,b,c", "a.>"])),
    max_size=6,
)


@slow(12)
@given(values=link_values)
def test_generated_link_values_start_or_are_refused_clearly(running, tmp_path_factory, values):
    url, _ = running
    folder = tmp_path_factory.mktemp("link")
    image = MANIFEST.parent / "build" / "bankaccount_aggregate.wasm"
    manifest = folder / "app.yaml"
    manifest.write_text(json.dumps({  # JSON is YAML
        "apiVersion": "core.oam.dev/v1beta1", "kind": "Application", "metadata": {"name": "generated"},
        "spec": {"components": [{"name": "c", "type": "component", "properties": {"image": f"file://{image}"},
                                 "traits": [{"type": "link", "properties": {"target": "concordance", "values": values}}]}]},
    }))
    process = DaemonProcess(manifest, folder / "d.log", "--nats-url", url)
    try:
        outcome = _started_or_refused(process)
    finally:
        code = process.stop()
    text = process.log_path.read_text()
    assert "Traceback" not in text, text
    if outcome == "refused":
        assert code == 2 and "error:" in text, text
    else:  # valid values: it served until told to stop, then stopped cleanly
        assert code == 0, text


def _started_or_refused(process: DaemonProcess, timeout: float = 60.0) -> str:
    """Wait until the daemon is ready to serve or has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            return "refused"
        if any(entry.get("event") == "concordance ready" for entry in process.logs()):
            return "started"
        time.sleep(0.1)  # polling, bounded by the deadline
    raise AssertionError(f"neither ready nor refused in {timeout}s:\n{process.log_path.read_text()}")
