"""HostData, link definitions and the dispatch envelope, as a host and a component send them."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import msgpack
import pytest

from concordance_provider.links import LinkError, Role
from concordance_provider.provider import (
    HostDataError,
    LinkDefinition,
    link_spec,
    open_secrets,
    parse_link,
    parse_link_deletion,
    read_host_data,
)
from concordance_provider.xkeys import XKey, XKeyError
from concordance_provider.runtime.envelope import CallReply, CallRequest, EnvelopeError


def _line(doc: object) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode() + "\r\n"


def test_host_data_is_read_from_the_stdin_line():
    host = read_host_data(_line({"lattice_rpc_prefix": "default", "provider_key": "VPROV", "host_id": "NHOST",
                                 "lattice_rpc_url": "nats://127.0.0.1:4222", "log_level": "Debug",
                                 "structured_logging": True, "some_future_field": 1}))
    assert (host.lattice_rpc_prefix, host.provider_key, host.python_log_level) == ("default", "VPROV", "debug")


@pytest.mark.parametrize("line, message", [
    ("", "no HostData"), ("***", "not base64"), (base64.b64encode(b"[1,").decode(), "not JSON"),
    (_line({"provider_key": "V"}), "lattice_rpc_prefix"), (_line([1, 2]), "invalid"),
])
def test_bad_host_data_says_what_is_wrong(line, message):
    with pytest.raises(HostDataError, match=message):
        read_host_data(line)


def _link(**source_config: str) -> LinkDefinition:
    return parse_link({"source_id": "bank-agg", "target": "VPROV", "source_config": source_config})


AGGREGATE = {"ROLE": "aggregate", "INTEREST": "bankaccount", "NAME": "bankaccount"}


def test_a_link_runs_on_a_host_by_default_and_in_process_from_the_component_directory(tmp_path: Path):
    remote = link_spec(_link(**AGGREGATE), "default", {})
    assert remote.dispatch_subject == "cc.dispatch.default.bank-agg" and remote.path is None
    assert remote.interest.role is Role.AGGREGATE
    wasm = tmp_path / "agg.wasm"
    wasm.write_bytes(b"\0asm")
    local = link_spec(_link(**AGGREGATE, COMPONENT_FILE="agg.wasm"), "default", {}, tmp_path)
    assert local.path == wasm.resolve() and local.dispatch_subject is None
    assert link_spec(_link(**AGGREGATE, COMPONENT_FILE=str(wasm)), "default", {}, tmp_path).path == wasm.resolve()
    with pytest.raises(LinkError, match="'missing.wasm' is not a file in the component directory"):
        link_spec(_link(**AGGREGATE, COMPONENT_FILE="missing.wasm"), "default", {}, tmp_path)


def test_a_dispatch_subject_outside_the_lattice_dispatch_subjects_is_refused():
    assert link_spec(_link(**AGGREGATE, DISPATCH_SUBJECT="cc.dispatch.default.orders"), "default",
                     {}).dispatch_subject == "cc.dispatch.default.orders"
    for subject in ("mallory.decides", "cc.dispatch.other.orders", "cc.dispatch.default", "cc.dispatch.defaultx.a"):
        with pytest.raises(LinkError, match="outside cc.dispatch.default.>"):
            link_spec(_link(**AGGREGATE, DISPATCH_SUBJECT=subject), "default", {})


def test_component_file_outside_the_component_directory_is_refused_alike_whether_it_exists(tmp_path: Path):
    inside = tmp_path / "components"
    inside.mkdir()
    secret = tmp_path / "secret.wasm"
    secret.write_bytes(b"\0asm")
    (inside / "link.wasm").symlink_to(secret)
    errors = set()
    for name in (str(secret), str(tmp_path / "absent.wasm"), "../secret.wasm", "../absent.wasm", "link.wasm"):
        with pytest.raises(LinkError) as refused:
            link_spec(_link(**AGGREGATE, COMPONENT_FILE=name), "default", {}, inside)
        errors.add(str(refused.value))
    assert errors == {f"COMPONENT_FILE must name a file in the component directory {inside.resolve()}"}
    with pytest.raises(LinkError, match="no component directory"):
        link_spec(_link(**AGGREGATE, COMPONENT_FILE=str(secret)), "default", {})


def test_concordance_values_are_read_from_target_config_then_source_config():
    link = parse_link({"source_id": "bank-agg", "target": "VPROV", "source_config": {**AGGREGATE, "KEY": "old"},
                       "target_config": {"key": "accountNumber", "max_deliveries": "4"}})
    spec = link_spec(link, "default", {})
    assert (spec.interest.key_field, spec.interest.max_deliveries) == ("accountNumber", 4)
    only_target = parse_link({"source_id": "bank-agg", "target": "VPROV", "target_config": AGGREGATE})
    assert link_spec(only_target, "default", {}).interest.name == "bankaccount"


def test_a_v1_0_link_deletion_without_target_is_understood():
    deletion = parse_link_deletion({"source_id": "bank-agg", "name": "default", "wit_namespace": "concordance",
                                    "wit_package": "eventsourcing"})
    assert (deletion.link_id, deletion.target) == ("bank-agg", "")
    assert parse_link_deletion({"source_id": "bank-agg", "name": "second"}).link_id == "bank-agg:second"
    with pytest.raises(LinkError, match="source_id"):
        parse_link_deletion({"name": "default"})


def test_sealed_link_secrets_open_with_the_host_data_xkeys_and_never_otherwise():
    host, provider = XKey.generate(), XKey.generate()
    sealed = list(host.seal(json.dumps({"token": {"kind": "String", "value": "s3cr3t"}}).encode(), provider))
    link = parse_link({"source_id": "a", "target": "VPROV", "target_secrets": sealed})
    assert open_secrets(link.target_secrets, (provider, XKey.from_public_key(host.public_key()))) == ["token"]
    assert "s3cr3t" not in repr(link) and str(sealed[:8])[1:-1] not in repr(link)
    with pytest.raises(LinkError, match="cannot be opened"):
        open_secrets(link.target_secrets, (XKey.generate(), host))
    with pytest.raises(LinkError, match="no xkey"):
        open_secrets(link.target_secrets, None)
    with pytest.raises(LinkError, match="array of byte values"):
        parse_link({"source_id": "a", "target": "VPROV", "target_secrets": "not bytes"})


def test_xkeys_follow_the_nkeys_format_of_other_implementations():
    # Keys and a message made by the Go nkeys library (the vectors the Rust and Go libraries test with).
    seed = "SXAKIYZX2POLIHZ5W5YZEWVTH24NLEUETBW3TKIVYRSS3GNHFXO5D4JJZM"
    public = "XBUJMZHVOPQ2SK5VD3TY4VNBPVU2YFGRLK6EFPEPSMVDUYEBSROWZCEA"
    sender = XKey.from_seed(seed)
    assert (sender.seed(), sender.public_key()) == (seed, public)
    receiver = XKey.from_seed("SXAHGC56LJFTSRXFC653AT7XZU6WGYIXU4XFPMCT62GGHFLUCSPVYP764M")
    sealed = bytes.fromhex("786b7631467698f98703502f4241b7a7347298" "00929f6d094b06c6e34a78de499ee7debbac9477"
                           "556f3fbbe90ffd678bc629e5b7cc7c57404d923846cf010226")
    assert receiver.open(sealed, XKey.from_public_key(public)) == b"this is super secret"
    tampered = sealed[:10] + bytes([sealed[10] ^ 1]) + sealed[11:]
    with pytest.raises(XKeyError):
        receiver.open(tampered, sender)
    for bad in ("SUANOTAREALSEED", public, seed[:-1] + "A"):
        with pytest.raises(XKeyError):
            XKey.from_seed(bad)


def test_host_data_xkeys_are_checked_without_echoing_them():
    provider_seed = XKey.generate().seed()
    fields = {"lattice_rpc_prefix": "default", "provider_key": "VPROV"}
    host = read_host_data(_line({**fields, "host_xkey_public_key": XKey.generate().public_key(),
                                 "provider_xkey_private_key": provider_seed}))
    assert host.xkeys() is not None and provider_seed not in repr(host)
    with pytest.raises(HostDataError, match="not a valid xkey seed") as bad:
        read_host_data(_line({**fields, "host_xkey_public_key": XKey.generate().public_key(),
                              "provider_xkey_private_key": "SXNOTASEED"}))
    assert "SXNOTASEED" not in str(bad.value)


def test_provider_config_gives_defaults_that_a_link_overrides():
    values = {"ROLE": "projector", "INTEREST": "a,b", "NAME": "p"}
    assert link_spec(_link(**values), "l", {"MAX_DELIVERIES": "3"}).interest.max_deliveries == 3
    assert link_spec(_link(**values, MAX_DELIVERIES="7"), "l", {"MAX_DELIVERIES": "3"}).interest.max_deliveries == 7
    assert link_spec(_link(**values), "l", {"NAME": "hijack"}).interest.name == "p"  # only defaults


@pytest.mark.parametrize("body, message", [
    (b"{", "not JSON"), (b"{}", "source_id"), (json.dumps({"source_id": "a b", "target": "V"}).encode(), "whitespace"),
])
def test_malformed_link_definitions_are_refused(body, message):
    with pytest.raises(LinkError, match=message):
        parse_link(body)


def test_envelope_round_trips_and_refuses_garbage():
    request = CallRequest(call="apply-event", args={"event": {"event_type": "x"}, "state": None}, callback="_INBOX.1")
    assert CallRequest.decode(request.encode()) == request
    assert CallReply.decode(msgpack.packb({"v": 1, "err": "no"})).err == "no"
    for garbage in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"call": "format-disk", "args": {}})):
        with pytest.raises(EnvelopeError):
            CallRequest.decode(garbage)


def test_console_logs_have_no_colour_codes_when_not_on_a_terminal(capsys):
    import structlog

    from concordance_provider.logging import configure

    configure("info", "console")
    try:
        structlog.get_logger("test").error("link definition refused", error="ROLE missing")
        output = capsys.readouterr().err
    finally:
        structlog.reset_defaults()
    assert "link definition refused" in output and "ROLE missing" in output
    assert "\x1b[" not in output
