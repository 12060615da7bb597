import base64
import json

import pytest

from concordance_provider.links import (
    DEFAULT_BATCH,
    LINK_BOUNDS,
    Interest,
    LinkError,
    ProcessLifetime,
    Role,
    link_settings,
    parse_interest,
)

PM_INTEREST = json.dumps({"start": "WireTransferInitiated", "advance": ["funds-reserved"], "stop": ["FundsCommitted"]})


def b64(doc) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


def test_aggregate_link():
    interest = parse_interest({"ROLE": "aggregate", "NAME": "bankaccount", "INTEREST": "bankaccount", "KEY": "accountNumber"})
    assert interest.role is Role.AGGREGATE
    assert interest.stream == "bankaccount"
    assert interest.key_field == "accountNumber"
    assert interest.max_messages_per_batch == DEFAULT_BATCH == 200
    assert interest.consumer_name == "AGG_EVT_bankaccount"


def test_keys_are_case_insensitive_and_trimmed():
    interest = parse_interest({" role ": " Projector ", "Name": " proj ", "interest": " AccountCreated , funds-deposited ,, "})
    assert interest.role is Role.PROJECTOR
    assert interest.name == "proj"
    assert interest.event_types == ("account_created", "funds_deposited")
    assert interest.interested_event_types == ("account_created", "funds_deposited")


@pytest.mark.parametrize(
    "role, consumer",
    [("aggregate", "AGG_EVT_x"), ("projector", "PROJ_x"), ("process_manager", "PM_x"), ("notifier", "NOTIFIER_x")],
)
def test_consumer_name_per_role(role, consumer):
    values = {"ROLE": role, "NAME": "x", "INTEREST": PM_INTEREST if role == "process_manager" else "evt", "KEY": "id"}
    assert parse_interest(values).consumer_name == consumer


@pytest.mark.parametrize("role", ["ProcessManager", "process-manager", "PROCESS_MANAGER", "process manager"])
def test_role_spellings_are_normalised(role):
    assert parse_interest({"ROLE": role, "NAME": "x", "INTEREST": PM_INTEREST, "KEY": "id"}).role is Role.PROCESS_MANAGER


def test_unknown_role_lists_valid_roles():
    with pytest.raises(LinkError) as err:
        parse_interest({"ROLE": "saga", "NAME": "x", "INTEREST": "evt"})
    assert "'saga'" in str(err.value)
    for role in Role:
        assert role.value in str(err.value)


@pytest.mark.parametrize("missing", ["ROLE", "NAME", "INTEREST"])
def test_missing_required_value_is_named(missing):
    values = {"ROLE": "projector", "NAME": "x", "INTEREST": "evt"}
    del values[missing]
    with pytest.raises(LinkError, match=f"missing required value\\(s\\): {missing}"):
        parse_interest(values)


def test_all_missing_values_listed():
    with pytest.raises(LinkError, match="ROLE, NAME, INTEREST"):
        parse_interest({})


@pytest.mark.parametrize("name", ["a.>", "*", "has space", "a.b"])
def test_unsafe_name_rejected(name):
    with pytest.raises(LinkError) as err:
        parse_interest({"ROLE": "projector", "NAME": name, "INTEREST": "evt"})
    assert "NAME" in str(err.value) and repr(name) in str(err.value)


def test_empty_name_rejected():
    with pytest.raises(LinkError, match="NAME"):
        parse_interest({"ROLE": "projector", "NAME": "  ", "INTEREST": "evt"})


def test_aggregate_stream_must_be_a_token():
    with pytest.raises(LinkError, match="'bank.account'"):
        parse_interest({"ROLE": "aggregate", "NAME": "x", "INTEREST": "bank.account"})


@pytest.mark.parametrize("interest", [",", " , ,"])
def test_projector_needs_an_event_type(interest):
    with pytest.raises(LinkError, match="at least one event type"):
        parse_interest({"ROLE": "projector", "NAME": "x", "INTEREST": interest})


def test_projector_bad_event_type_named():
    with pytest.raises(LinkError, match="'funds.deposited'"):
        parse_interest({"ROLE": "notifier", "NAME": "x", "INTEREST": "ok,funds.deposited"})


def test_process_manager_lifetime_is_snake_cased():
    interest = parse_interest({"ROLE": "process_manager", "NAME": "xfer", "INTEREST": PM_INTEREST, "KEY": "wireTransferId"})
    assert interest.lifetime == ProcessLifetime(start="wire_transfer_initiated", advance=("funds_reserved",), stop=("funds_committed",))
    assert interest.interested_event_types == ("wire_transfer_initiated", "funds_reserved", "funds_committed")
    assert interest.key_field == "wireTransferId"


def test_process_manager_lifetime_only_start():
    interest = parse_interest({"ROLE": "process_manager", "NAME": "x", "INTEREST": '{"start": "a"}', "KEY": "id"})
    assert interest.lifetime.event_types() == ("a",)


def test_process_manager_malformed_json_quotes_value():
    with pytest.raises(LinkError) as err:
        parse_interest({"ROLE": "process_manager", "NAME": "x", "INTEREST": "{start: a", "KEY": "id"})
    assert "not valid JSON" in str(err.value) and "'{start: a'" in str(err.value)


@pytest.mark.parametrize(
    "doc, message",
    [
        ('["a"]', "must be"),
        ('{"advance": ["a"]}', "must be"),
        ('{"start": 1}', "must be"),
        ('{"start": "a", "advance": "b"}', "'advance' must be a list of strings"),
        ('{"start": "a", "stop": [1]}', "'stop' must be a list of strings"),
        ('{"start": "a", "stop": null}', "'stop' must be a list of strings"),
        ('{"start": "a", "finish": ["b"], "zz": 1}', "unknown fields: ['finish', 'zz']"),
        ('{"start": "a.b"}', "'a.b'"),
    ],
)
def test_process_manager_wrong_shapes(doc, message):
    with pytest.raises(LinkError) as err:
        parse_interest({"ROLE": "process_manager", "NAME": "x", "INTEREST": doc, "KEY": "id"})
    assert message in str(err.value)


def test_process_manager_needs_key():
    with pytest.raises(LinkError, match="KEY"):
        parse_interest({"ROLE": "process_manager", "NAME": "x", "INTEREST": PM_INTEREST})


def test_config_b64():
    encoded = b64({"role": "process_manager", "interest": PM_INTEREST, "name": "xfer", "key_field": "wireTransferId"})
    assert "=" not in encoded
    interest = parse_interest({"CONFIG_B64": encoded})
    assert interest.role is Role.PROCESS_MANAGER
    assert interest.name == "xfer"
    assert interest.key_field == "wireTransferId"
    assert interest.lifetime.start == "wire_transfer_initiated"


def test_config_b64_interest_as_json_object():
    encoded = b64({"role": "process_manager", "interest": {"start": "a", "stop": ["b"]}, "name": "x", "key_field": "id"})
    assert parse_interest({"config_b64": encoded}).interested_event_types == ("a", "b")


def test_explicit_values_override_config_b64():
    encoded = b64({"role": "projector", "interest": "a", "name": "from_config"})
    assert parse_interest({"CONFIG_B64": encoded, "NAME": "explicit"}).name == "explicit"


@pytest.mark.parametrize("encoded", ["!!!!", b64([1, 2]).replace("=", ""), base64.urlsafe_b64encode(b"\xff\xfe").decode()])
def test_config_b64_malformed(encoded):
    with pytest.raises(LinkError, match="CONFIG_B64"):
        parse_interest({"CONFIG_B64": encoded})


@pytest.mark.parametrize("raw, expected", [("50", 50), ("abc", 200), ("0", 200), ("-5", 200), ("1.5", 200), ("", 200)])
def test_max_messages_per_batch_falls_back_to_default(raw, expected):
    values = {"ROLE": "projector", "NAME": "x", "INTEREST": "a", "max_messages_per_batch": raw}
    assert parse_interest(values).max_messages_per_batch == expected


@pytest.mark.parametrize("key, raw", [("CALL_TIMEOUT_MS", "abc"), ("CALL_TIMEOUT_MS", "0"), ("MAX_MEMORY_MB", "-1")])
def test_strict_integers_rejected(key, raw):
    with pytest.raises(LinkError, match=f"{key} must be a positive integer, got {raw!r}"):
        parse_interest({"ROLE": "projector", "NAME": "x", "INTEREST": "a", key: raw})


def test_integer_settings_parsed():
    interest = parse_interest(
        {"ROLE": "projector", "NAME": "x", "INTEREST": "a", "CALL_TIMEOUT_MS": "500", "MAX_MEMORY_MB": "64"}
    )
    assert (interest.call_timeout_ms, interest.max_memory_mb) == (500, 64)


@pytest.mark.parametrize("key, raw, expected", [
    ("CALL_TIMEOUT_MS", "1", "CALL_TIMEOUT_MS '1' is out of range: it must be 100 to 600000 ms"),
    ("CALL_TIMEOUT_MS", "600001", "CALL_TIMEOUT_MS '600001' is out of range: it must be 100 to 600000 ms"),
    ("MAX_MEMORY_MB", "8", "MAX_MEMORY_MB '8' is out of range: it must be 16 to 4096 MiB"),
    ("MAX_MEMORY_MB", "65536", "MAX_MEMORY_MB '65536' is out of range: it must be 16 to 4096 MiB"),
    ("MAX_DELIVERIES", "1000000", "MAX_DELIVERIES '1000000' is out of range: it must be 1 to 100 deliveries"),
    ("ACK_WAIT_MS", "999", "ACK_WAIT_MS '999' is out of range: it must be 1000 to 300000 ms"),
    ("ACK_WAIT_MS", "86400000", "ACK_WAIT_MS '86400000' is out of range: it must be 1000 to 300000 ms"),
    ("MAX_MESSAGES_PER_BATCH", "1001",
     "MAX_MESSAGES_PER_BATCH '1001' is out of range: it must be 1 to 1000 messages"),
])
def test_out_of_range_settings_are_refused_naming_value_and_range(key, raw, expected):
    with pytest.raises(LinkError) as err:
        parse_interest({"ROLE": "projector", "NAME": "x", "INTEREST": "a", key: raw})
    assert str(err.value) == expected


@pytest.mark.parametrize("key", sorted(LINK_BOUNDS))
def test_each_bound_is_inclusive_at_both_ends(key):
    bound = LINK_BOUNDS[key]
    for number in (bound.low, bound.high):
        interest = parse_interest({"ROLE": "projector", "NAME": "x", "INTEREST": "a", key: str(number)})
        assert getattr(interest, key.lower()) == number
    assert getattr(parse_interest({"ROLE": "projector", "NAME": "x", "INTEREST": "a"}), key.lower()) == bound.default
    assert bound.low <= bound.default <= bound.high


def test_link_settings_checks_defaults_for_every_link_as_a_link_would():
    assert link_settings({"call_timeout_ms": "500", "Max_Deliveries": "3", "colour": "blue"}) == {
        "CALL_TIMEOUT_MS": 500, "MAX_DELIVERIES": 3}
    with pytest.raises(LinkError, match="CALL_TIMEOUT_MS '1' is out of range"):
        link_settings({"CALL_TIMEOUT_MS": "1"})


def test_read_model_bucket():
    base = {"ROLE": "projector", "NAME": "x", "INTEREST": "a"}
    assert parse_interest({**base, "READ_MODEL_BUCKET": "accounts"}).read_model_bucket == "accounts"
    with pytest.raises(LinkError, match="READ_MODEL_BUCKET"):
        parse_interest({**base, "READ_MODEL_BUCKET": "a.b"})


def test_non_string_value_rejected():
    with pytest.raises(LinkError, match="'NAME' must be a string, got int"):
        parse_interest({"ROLE": "projector", "NAME": 5, "INTEREST": "a"})


def test_interest_is_frozen():
    interest = parse_interest({"ROLE": "projector", "NAME": "x", "INTEREST": "a"})
    with pytest.raises(Exception):
        interest.name = "y"
    assert isinstance(interest, Interest)
