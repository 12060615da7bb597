"""`concordance provider` driven exactly as a wasmCloud 1.x host drives a capability provider."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import nats
import pytest

from .harness import (
    ProviderProcess,
    client,
    daemon,
    eventually,
    example_manifest,
    host_data_line,
    kv_json,
    nats_server,
    result,
    send,
)

from .wasmcloud1_host import SHUTDOWN_DELAY, V1_0_0, V1_9_2, Link, WasmCloud1Host, server_nkey

pytestmark = pytest.mark.integration

PROVIDER = "VCONCORDANCETEST"


def _link(source_id: str, wasm: Path, **values: str) -> dict:
    return {"source_id": source_id, "target": PROVIDER, "name": "default", "wit_namespace": "concordance",
            "wit_package": "eventsourcing", "interfaces": ["aggregate"],
            "source_config": {"COMPONENT_FILE": wasm.name, **values}, "target_config": {},
            "source_secrets": None, "target_secrets": None}


def _component_dir(components: dict[str, Path]) -> dict[str, str]:
    """The provider config that lets COMPONENT_FILE name the example's built components."""
    return {"COMPONENT_DIR": str(next(iter(components.values())).parent)}


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
        provider = ProviderProcess(host_data_line(server.url, lattice, PROVIDER, [_aggregate(example_components)],
                                                  config=_component_dir(example_components)),
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
                from_provider = await _ask(nc, f"{rpc}.linkdefs.put", {"source_id": PROVIDER, "target": "some-component"})
                assert from_provider["accepted"] is False and "source" in from_provider["error"]
                others = await _ask(nc, f"{rpc}.linkdefs.del", {"source_id": "bankaccount-aggregate", "target": "VOTHER"})
                assert others["accepted"] is False and "not this provider" in others["error"]
                taken = await _ask(nc, f"{rpc}.linkdefs.put", {**_aggregate(example_components), "source_id": "twin"})
                assert taken["accepted"] is False and "AGG_EVT_bankaccount" in taken["error"]
                assert (await _ask(nc, f"{rpc}.health", b""))["healthy"] is True

                # Config: link-value defaults reach every link; unknown keys and values out of
                # range are refused whole, naming what is wrong, and change nothing.
                config = await _ask(nc, f"{rpc}.config.update", {**_component_dir(example_components),
                                                                 "MAX_DELIVERIES": "3"})
                assert config == {"accepted": True, "errors": {}}
                assert (await _interests(nc))["bankaccount-projector"]["max_deliveries"] == 3
                unknown = await _ask(nc, f"{rpc}.config.update", {"MAX_DELIVERIES": "4", "colour": "blue"})
                assert unknown["accepted"] is False and "COLOUR" in unknown["error"]
                tiny = await _ask(nc, f"{rpc}.config.update", {**_component_dir(example_components),
                                                               "CALL_TIMEOUT_MS": "1"})
                assert tiny == {"accepted": False, "error": "CALL_TIMEOUT_MS '1' is out of range: it must be "
                                                            "100 to 600000 ms; nothing was changed"}
                moved = await _ask(nc, f"{rpc}.config.update", {"COMPONENT_DIR": "/"})
                assert moved["accepted"] is False and "read once, at start" in moved["error"]
                interests = await _interests(nc)
                assert interests["bankaccount-projector"]["max_deliveries"] == 3
                assert interests["bankaccount-projector"]["call_timeout_ms"] == 10_000

                # Only its own host may shut it down; another host's request gets no answer at all.
                with pytest.raises(nats.errors.TimeoutError):
                    await nc.request(f"{rpc}.default.shutdown", b'{"host_id":"NSOMEONEELSE"}', timeout=1)
                assert (await _ask(nc, f"{rpc}.health", b""))["healthy"] is True

                # Shutdown: answered within the host's 300 ms; left alone, the process then exits 0.
                started = time.monotonic()
                reply = await nc.request(f"{rpc}.default.shutdown", b'{"host_id":"NHOSTTEST"}', timeout=0.3)
                assert json.loads(reply.data) == {"accepted": True} and time.monotonic() - started < 0.3
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


async def _interests(nc) -> dict[str, dict]:
    status = json.loads((await nc.request("cc.status", b"", timeout=10)).data)
    return {c["name"]: c["interest"] for c in status["components"]}


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
                                                  lattice_rpc_user_jwt=jwt, lattice_rpc_user_seed=seed,
                                                  config=_component_dir(example_components)),
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
    assert "\x1b[" not in output  # no colour codes in a file


async def _health_or_none(nc, subject: str):
    try:
        return json.loads((await nc.request(subject, b"", timeout=1)).data)
    except Exception:
        return None


COMMANDS = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "commands"
ACK_WAIT_S = 30  # long, so that a message left waiting for it cannot go unnoticed


def _command(name: str) -> dict:
    return json.loads((COMMANDS / f"{name}.json").read_text())


def _bank_links(provider_key: str) -> tuple[Link, Link]:
    aggregate = Link("bankaccount-aggregate", provider_key, target_config={
        "ROLE": "aggregate", "INTEREST": "bankaccount", "NAME": "bankaccount", "KEY": "accountNumber",
        "COMPONENT_FILE": "bankaccount_aggregate.wasm", "ACK_WAIT_MS": str(ACK_WAIT_S * 1000)})
    projector = Link("bankaccount-projector", provider_key, interfaces=("stateless-handler",), target_config={
        "ROLE": "projector", "NAME": "bankaccount_projector", "COMPONENT_FILE": "bankaccount_projector.wasm",
        "ACK_WAIT_MS": str(ACK_WAIT_S * 1000),
        "INTEREST": "account_created,funds_deposited,funds_withdrawn,funds_reserved,funds_committed,funds_released"},
        secrets={"READ_MODEL_TOKEN": "s3cr3t-never-logged"})
    return aggregate, projector


async def _send_all(nc, bodies: list[dict], sent: list[int]) -> None:
    """Send one command after another, a few milliseconds apart, noting each sequence."""
    for body in bodies:
        sent.append(await send(nc, "bankaccount", body))
        await asyncio.sleep(0.005)


async def _count(text: str, words: str) -> int:
    return text.count(words)


async def _linked(nc) -> set[str]:
    return set(await _interests(nc))


@pytest.mark.parametrize("version", [V1_9_2, V1_0_0], ids=lambda v: v.name)
async def test_a_wasmcloud_1_host_runs_the_bank_through_the_provider(version, example_components, tmp_path):
    components = _component_dir(example_components)
    with nats_server(tmp_path) as server:
        host = WasmCloud1Host(version, server.url, f"lattice{uuid.uuid4().hex[:6]}", "concordance",
                              components, tmp_path / "provider.log", structured_logging=version.xkeys,
                              host_secrets={"HOST_WIDE": "h0st-s3cr3t"})
        aggregate, projector = _bank_links(host.provider_key)
        host.links = [aggregate]  # known to the host when it starts the provider: in HostData
        host.start()
        try:
            async with client(server.url) as nc:
                host.check_health_on_schedule(nc)
                await host.wait_serving(nc)

                # Puts on every subject this host uses; duplicates change nothing.
                await host.put_link(nc, projector)
                assert await eventually(lambda: _linked(nc), {"bankaccount-aggregate", "bankaccount-projector"})
                await host.put_link(nc, aggregate)  # as in HostData: from 1.1 it arrives twice
                copies = 2 if version.xkeys else 1  # the provider's id subject, and its xkey subject
                assert await eventually(lambda: _count(host.log_text(), "link unchanged"), copies) == copies

                # A put/del race, as fast as the host can publish: handled in order, the deleted
                # link stays deleted, and a config update afterwards does not bring it back.
                for _ in range(3):
                    await host.put_link(nc, projector)
                    await host.delete_link(nc, projector)
                assert await eventually(lambda: _linked(nc), {"bankaccount-aggregate"}) == {"bankaccount-aggregate"}
                if version.config_update:
                    await host.update_config(nc, {**components, "CALL_TIMEOUT_MS": "1"})  # refused: out of range
                    await host.update_config(nc, {**components, "MAX_DELIVERIES": "4"})
                    assert await eventually(lambda: _interests(nc),
                                            lambda i: i.get("bankaccount-aggregate", {}).get("max_deliveries") == 4)
                await asyncio.sleep(1.0)
                assert await _linked(nc) == {"bankaccount-aggregate"}
                await host.put_link(nc, projector)
                assert await eventually(lambda: _linked(nc), {"bankaccount-aggregate", "bankaccount-projector"})
                interests = await _interests(nc)
                assert interests["bankaccount-aggregate"]["call_timeout_ms"] == 10_000

                # The original scenario; the last commands and a burst on another account are sent
                # just before the host stops the provider, without waiting for their outcomes.
                sent = [await send(nc, "bankaccount", _command(name)) for name in ("create_account_cmd",
                                                                                   "deposit_cmd_1")]
                assert (await result(nc, sent[-1]))["status"] == "accepted"
                burst = [{"command_type": "create_account", "key": "BURST",
                          "data": {"accountNumber": "BURST", "initialBalance": 0, "customerId": "C"}}]
                burst += [{"command_type": "deposit_funds", "key": "BURST",
                           "data": {"accountNumber": "BURST", "amount": 10, "customerId": "C"}}] * 60

                # The host's first health check (5 s after start) finds it healthy.
                await host.health_checked(1)
                assert host.health_answers[0] == {"healthy": True, "message": None}

                # Another host running the same provider id stops its own: no answer from this one.
                answer, _ = await host.shutdown_request(nc, host_id=server_nkey())
                assert answer is None and host.alive()
                assert (await host.health(nc) or {}).get("healthy") is True

                sent.append(await send(nc, "bankaccount", burst[0]))
                sent += [await send(nc, "bankaccount", _command(name)) for name in ("deposit_cmd_2", "withdraw_cmd_1")]
                # Deposits keep coming while the host stops the provider, up to the kill.
                sending = asyncio.create_task(_send_all(nc, burst[1:], sent))
                await asyncio.sleep(0.1)
                answer, took = await host.stop_provider(nc)
                killed = time.monotonic()
                await sending
                assert answer is not None and took < SHUTDOWN_DELAY, (answer, took)
                assert not host.alive()

                # The host starts the provider again: every command sent before the kill has its
                # outcome, exactly once, and the account ends at 6000.
                host.start()
                await host.wait_serving(nc)
                outcomes = [await result(nc, seq, timeout=60) for seq in sent]
                recovered_in = time.monotonic() - killed
                assert all(o["status"] == "accepted" for o in outcomes), outcomes
                assert await eventually(lambda: _balance(nc, "ABC123"), 6000) == 6000
                assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.ABC123"))["balance"] == 6000
                assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.BURST"))["balance"] == 600
                assert await eventually(lambda: _balance(nc, "BURST"), 600) == 600
                await host.stop_provider(nc)
        finally:
            await host.stop_health()
            host.kill()
    output = host.log_text()
    for secret in ("s3cr3t-never-logged", "h0st-s3cr3t", host.provider_xkey.seed()):
        assert secret not in output
    assert "\x1b[" not in output and "Traceback" not in output
    assert "config update refused" in output if version.config_update else True
    # Nothing the killed provider held waited for the ack wait (30 s here): it had been handed back.
    assert recovered_in < ACK_WAIT_S / 2, f"outcomes {recovered_in:.1f}s after the kill: some waited for the ack wait"


async def test_the_lattice_control_plane_is_closed(example_components, tmp_path):
    build = next(iter(example_components.values())).parent
    manifest = example_manifest(tmp_path, {})
    projector = {"source_id": "bankaccount-projector", "target": "concordance", "name": "default",
                 "target_config": {"ROLE": "projector", "NAME": "bankaccount_projector", "INTEREST": "account_created",
                                   "COMPONENT_FILE": "bankaccount_projector.wasm"}}
    with nats_server(tmp_path) as server:
        # Without --lattice nobody serves the provider subjects.
        with daemon(manifest, tmp_path / "plain.log", "--nats-url", server.url):
            async with client(server.url) as nc:
                for suffix in ("linkdefs.put", "linkdefs.del", "config.update", "health", "default.shutdown"):
                    with pytest.raises(nats.errors.NoRespondersError):
                        await nc.request(f"wasmbus.rpc.default.concordance.{suffix}", b"{}", timeout=5)

        rpc = "wasmbus.rpc.ctl.concordance"
        with daemon(manifest, tmp_path / "lattice.log", "--nats-url", server.url, "--lattice", "ctl",
                    "--component-dir", str(build)):
            async with client(server.url) as nc:
                # A manifest's component is neither replaced nor unlinked from the lattice.
                replaced = await _ask(nc, f"{rpc}.linkdefs.put", projector)
                assert replaced["accepted"] is False and "declared by the manifest" in replaced["error"]
                twin = await _ask(nc, f"{rpc}.linkdefs.put", {**projector, "source_id": "twin"})
                assert twin["accepted"] is False and "declared by the manifest" in twin["error"]
                removed = await _ask(nc, f"{rpc}.linkdefs.del", {"source_id": "bankaccount-projector"})
                assert removed["accepted"] is False and "--allow-lattice-replace" in removed["error"]

                # COMPONENT_FILE names only files of the component directory, and the error for
                # any other path says nothing about whether it exists.
                errors = set()
                for path in ("/etc/passwd", "/no/such/file.wasm", "../../../../etc/hostname", "../missing.wasm"):
                    other = {**projector, "source_id": "other",
                             "target_config": {**projector["target_config"], "NAME": "other", "COMPONENT_FILE": path}}
                    refused = await _ask(nc, f"{rpc}.linkdefs.put", other)
                    assert refused["accepted"] is False
                    errors.add(refused["error"])
                assert errors == {f"COMPONENT_FILE must name a file in the component directory {build.resolve()}"}

                # The manifest's components still serve.
                created = await result(nc, await send(nc, "bankaccount", _command("create_account_cmd")))
                assert created["status"] == "accepted"

        # The operator may allow the lattice to replace them.
        with daemon(manifest, tmp_path / "allowed.log", "--nats-url", server.url, "--lattice", "ctl",
                    "--component-dir", str(build), "--allow-lattice-replace"):
            async with client(server.url) as nc:
                replaced = await _ask(nc, f"{rpc}.linkdefs.put", projector)
                assert replaced["accepted"] is True, replaced
                assert (await _interests(nc))["bankaccount-projector"]["event_types"] == ["account_created"]
