"""HostData, link definitions and the dispatch envelope, as a host and a component send them."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import msgpack
import pytest

from concordance_provider.links import LinkError, Role
from concordance_provider.provider import HostDataError, LinkDefinition, link_spec, parse_link, read_host_data
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


def test_a_link_runs_on_a_host_by_default_and_in_process_when_given_a_file(tmp_path: Path):
    values = {"ROLE": "aggregate", "INTEREST": "bankaccount", "NAME": "bankaccount"}
    remote = link_spec(_link(**values), "default", {})
    assert remote.dispatch_subject == "cc.dispatch.default.bank-agg" and remote.path is None
    assert remote.interest.role is Role.AGGREGATE
    wasm = tmp_path / "agg.wasm"
    wasm.write_bytes(b"\0asm")
    local = link_spec(_link(**values, COMPONENT_FILE=str(wasm)), "default", {})
    assert local.path == wasm and local.dispatch_subject is None
    with pytest.raises(LinkError, match="does not exist"):
        link_spec(_link(**values, COMPONENT_FILE=str(tmp_path / "missing.wasm")), "default", {})


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
