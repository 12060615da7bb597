"""`concordance provider` driven exactly as a wasmCloud 1.x host drives a capability provider."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from .harness import (
    ProviderProcess,
    client,
    eventually,
    host_data_line,
    kv_json,
    nats_server,
    result,
    send,
)

pytestmark = pytest.mark.integration

PROVIDER = "VCONCORDANCETEST"


def _link(source_id: str, wasm: Path, **values: str) -> dict:
    return {"source_id": source_id, "target": PROVIDER, "name": "default", "wit_namespace": "concordance",
            "wit_package": "eventsourcing", "interfaces": ["aggregate"],
            "source_config": {"COMPONENT_FILE": str(wasm), **values}, "target_config": {},
            "source_secrets": None, "target_secrets": None}


def _aggregate(components: dict[str, Path]) -> dict:
    return _link("bankaccount-aggregate", components["bankaccount_aggregate"], ROLE="aggregate",
                 INTEREST="bankaccount", NAME="bankaccount", KEY="accountNumber")


def _projector(components: dict[str, Path]) -> dict:
    return _link("bankaccount-projector", components["bankaccount_projector"], ROLE="projector",
                 NAME="bankaccount_projector",
                 INTEREST="account_created,funds_deposited,funds_withdrawn,funds_reserved,funds_committed,funds_released")


async def _ask(nc, subject: str, body: object) -> dict:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return json.loads((await nc.request(subject, data, timeout=30)).data)


async def test_host_drives_the_provider_through_its_whole_life(example_components, tmp_path):
    lattice = f"test{uuid.uuid4().hex[:6]}"
    rpc = f"wasmbus.rpc.{lattice}.{PROVIDER}"
    with nats_server(tmp_path) as server:
        provider = ProviderProcess(host_data_line(server.url, lattice, PROVIDER, [_aggregate(example_components)]),
                                   tmp_path / "provider.log")
        try:
            provider.wait_ready()
            async with client(server.url) as nc:
                assert await _ask(nc, f"{rpc}.health", b"") == {"healthy": True, "message": None}

                # The HostData link is live: the aggregate decides.
                created = await result(nc, await send(nc, "bankaccount", {
                    "command_type": "create_account", "key": "P1",
                    "data": {"accountNumber": "P1", "initialBalance": 100, "customerId": "C1"}}))
                assert created["status"] == "accepted"

                # A link put starts the projector, which catches up with the log.
                put = await _ask(nc, f"{rpc}.linkdefs.put", _projector(example_components))
                assert put["accepted"] is True
                assert await eventually(lambda: _balance(nc, "P1"), 100) == 100

                # A link del stops it; events pile up in its durable consumer meanwhile.
                deleted = await _ask(nc, f"{rpc}.linkdefs.del", _projector(example_components))
                assert deleted == {"accepted": True, "component": "bankaccount-projector", "was_linked": True}
                for amount in (10, 20):
                    assert (await result(nc, await send(nc, "bankaccount", {
                        "command_type": "deposit_funds", "key": "P1",
                        "data": {"accountNumber": "P1", "amount": amount, "customerId": "C1"}})))["status"] == "accepted"
                info = await eventually(lambda: _consumer(nc, "PROJ_bankaccount_projector"),
                                        lambda i: i.num_pending == 2)
                assert info.num_pending == 2
                assert await _balance(nc, "P1") == 100

                # Put again: it resumes where it stopped, applying each event exactly once.
                assert (await _ask(nc, f"{rpc}.linkdefs.put", _projector(example_components)))["accepted"]
                assert await eventually(lambda: _balance(nc, "P1"), 130) == 130

                # Malformed link definitions get clear errors; the provider stays healthy.
                not_json = await _ask(nc, f"{rpc}.linkdefs.put", b"{not json")
                assert not_json["accepted"] is False and "not JSON" in not_json["error"]
                no_role = _aggregate(example_components)
                del no_role["source_config"]["ROLE"]
                missing = await _ask(nc, f"{rpc}.linkdefs.put", {**no_role, "source_id": "broken"})
                assert missing["accepted"] is False and "ROLE" in missing["error"]
                no_source = await _ask(nc, f"{rpc}.linkdefs.put", {"target": PROVIDER})
                assert no_source["accepted"] is False and "source_id" in no_source["error"]
                taken = await _ask(nc, f"{rpc}.linkdefs.put", {**_aggregate(example_components), "source_id": "twin"})
                assert taken["accepted"] is False and "AGG_EVT_bankaccount" in taken["error"]
                assert (await _ask(nc, f"{rpc}.health", b""))["healthy"] is True

                # Config: link-value defaults reach every link; unknown keys are named.
                config = await _ask(nc, f"{rpc}.config.update", {"MAX_DELIVERIES": "3", "colour": "blue"})
                assert config == {"accepted": True, "errors": {}, "ignored": ["COLOUR"]}
                status = json.loads((await nc.request("cc.status", b"", timeout=10)).data)
                interests = {c["name"]: c["interest"] for c in status["components"]}
                assert interests["bankaccount-projector"]["max_deliveries"] == 3
                # Defaults are held to the bounds of link values; a refused update changes nothing.
                tiny = await _ask(nc, f"{rpc}.config.update", {"CALL_TIMEOUT_MS": "1"})
                assert tiny == {"accepted": False,
                                "error": "CALL_TIMEOUT_MS '1' is out of range: it must be 100 to 600000 ms"}
                status = json.loads((await nc.request("cc.status", b"", timeout=10)).data)
                interests = {c["name"]: c["interest"] for c in status["components"]}
                assert interests["bankaccount-projector"]["call_timeout_ms"] == 10_000
                assert interests["bankaccount-projector"]["max_deliveries"] == 3

                # Only its own host may shut it down.
                refused = await _ask(nc, f"{rpc}.default.shutdown", {"host_id": "NSOMEONEELSE"})
                assert refused == {"accepted": False, "error": "not this provider's host"}
                assert (await _ask(nc, f"{rpc}.health", b""))["healthy"] is True

                # Shutdown: the reply comes once in-flight work is done, then the process exits 0.
                reply = await _ask(nc, f"{rpc}.default.shutdown", {"host_id": "NHOSTTEST"})
                assert reply == {"accepted": True}
            assert provider.wait() == 0
        finally:
            provider.stop()
    events = [e.get("event") for e in provider.logs()]
    assert "link definition refused" in events and "concordance stopped" in events


async def test_malformed_host_data_is_refused_clearly(tmp_path):
    for line, expected in ((b"\r\n", "no HostData"), (b"%%%\r\n", "not base64"),
                           (b"bm90IGpzb24=\r\n", "not JSON"),  # "not json"
                           (host_data_line("nats://127.0.0.1:1", "", PROVIDER, []), "lattice_rpc_prefix")):
        provider = ProviderProcess(line, tmp_path / "provider.log")
        try:
            assert provider.wait(30) == 2
        finally:
            provider.stop()
        output = (tmp_path / "provider.log").read_text()
        assert expected in output and "Traceback" not in output


async def _balance(nc, account: str):
    doc = await kv_json(nc, "CC_RM_bankaccount_projector", f"balance.{account}")
    return doc["balance"] if doc else None


async def _consumer(nc, durable: str):
    return await nc.jetstream().consumer_info("CC_EVENTS", durable)


async def test_provider_connects_with_the_host_data_jwt_and_seed(example_components, tmp_path):
    from .test_security import _operator_setup, configured_server

    settings, creds = _operator_setup(tmp_path)
    lines = creds.read_text().splitlines()
    jwt = lines[lines.index("-----BEGIN NATS USER JWT-----") + 1]
    seed = next(line for line in lines if line.startswith("SU"))
    lattice = "jwtlattice"
    with configured_server(tmp_path, settings) as url:
        provider = ProviderProcess(host_data_line(url, lattice, PROVIDER, [_aggregate(example_components)],
                                                  lattice_rpc_user_jwt=jwt, lattice_rpc_user_seed=seed),
                                   tmp_path / "provider.log")
        try:
            provider.wait_ready()
            async with nats_client_with(url, creds) as nc:
                created = await result(nc, await send(nc, "bankaccount", {
                    "command_type": "create_account", "key": "J1",
                    "data": {"accountNumber": "J1", "initialBalance": 7, "customerId": "C1"}}))
                assert created["status"] == "accepted"
                reply = await _ask(nc, f"wasmbus.rpc.{lattice}.{PROVIDER}.default.shutdown", {"host_id": "NHOSTTEST"})
                assert reply == {"accepted": True}
            assert provider.wait() == 0
        finally:
            provider.stop()
        assert seed not in (tmp_path / "provider.log").read_text()

        wrong = ProviderProcess(host_data_line(url, lattice, PROVIDER, [], lattice_rpc_user_jwt=jwt,
                                               lattice_rpc_user_seed="SUANOTAREALSEED"), tmp_path / "wrong.log")
        try:
            assert wrong.wait(60) == 2
        finally:
            wrong.stop()
        output = (tmp_path / "wrong.log").read_text()
        assert "Traceback" not in output and "not a valid nkey seed" in output and "SUANOTAREALSEED" not in output


def nats_client_with(url: str, creds: Path):
    import contextlib

    import nats

    @contextlib.asynccontextmanager
    async def connected():
        nc = await nats.connect(url, user_credentials=str(creds))
        try:
            yield nc
        finally:
            await nc.close()

    return connected()


async def test_log_level_and_plain_logging_are_honoured(tmp_path):
    lattice = "quiet"
    with nats_server(tmp_path) as server:
        provider = ProviderProcess(host_data_line(server.url, lattice, PROVIDER, [], structured_logging=False,
                                                  log_level="WARN"), tmp_path / "provider.log")
        try:
            async with client(server.url) as nc:
                health = await eventually(lambda: _health_or_none(nc, f"wasmbus.rpc.{lattice}.{PROVIDER}.health"),
                                          lambda h: h is not None, timeout=60)
                assert health == {"healthy": True, "message": None}
                refused = await _ask(nc, f"wasmbus.rpc.{lattice}.{PROVIDER}.linkdefs.put", {"target": PROVIDER})
                assert refused["accepted"] is False
                await _ask(nc, f"wasmbus.rpc.{lattice}.{PROVIDER}.default.shutdown", {"host_id": "NHOSTTEST"})
            assert provider.wait() == 0
        finally:
            provider.stop()
    output = (tmp_path / "provider.log").read_text()
    assert "link definition refused" in output  # an error: logged at WARN
    assert "concordance ready" not in output  # info: not logged at WARN
    assert not any(line.startswith("{") for line in output.splitlines())  # plain, not JSON


async def _health_or_none(nc, subject: str):
    try:
        return json.loads((await nc.request(subject, b"", timeout=1)).data)
    except Exception:
        return None
