import pytest

from concordance_provider import naming
from concordance_provider.naming import (
    InvalidName,
    check_token,
    parse_event_subject,
    snake_case,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("DepositFunds", "deposit_funds"),
        ("deposit-funds", "deposit_funds"),
        ("deposit_funds", "deposit_funds"),
        ("  Deposit Funds  ", "deposit_funds"),
        ("depositFunds", "deposit_funds"),
        ("HTTPServerStarted", "http_server_started"),
        ("Funds2Deposit", "funds2_deposit"),
        ("already_snake", "already_snake"),
    ],
)
def test_snake_case(raw, expected):
    assert snake_case(raw) == expected


@pytest.mark.parametrize("value", ["abc", "A-Z_09", "b64==", "x" * 128])
def test_check_token_accepts_safe_tokens(value):
    assert check_token(value, "key") == value


@pytest.mark.parametrize(
    "value", ["", "a.b", "*", ">", "a>", "has space", "tab\there", "x" * 129, "ünïcode", "a/b", None, 42]
)
def test_check_token_rejects_unsafe_values_naming_them(value):
    with pytest.raises(InvalidName) as err:
        check_token(value, "key")
    assert str(err.value).startswith("key ")
    assert repr(value) in str(err.value)


def test_check_token_rejects_trailing_newline():
    # A newline in a subject token would break the NATS protocol line it is sent on.
    with pytest.raises(InvalidName):
        check_token("abc\n", "key")


def test_subject_builders_round_trip():
    subject = naming.event_subject("funds_deposited", "bankaccount", "ACC-1")
    assert subject == "cc.events.funds_deposited.bankaccount.ACC-1"
    assert parse_event_subject(subject) == ("funds_deposited", "bankaccount", "ACC-1")
    assert naming.command_subject("bankaccount") == "cc.commands.bankaccount"
    assert naming.event_type_filter("funds_deposited") == "cc.events.funds_deposited.>"
    assert naming.stream_filter("bankaccount") == "cc.events.*.bankaccount.*"
    assert naming.instance_filter("bankaccount", "ACC-1") == "cc.events.*.bankaccount.ACC-1"
    assert naming.aggregate_state_key("bankaccount", "ACC-1") == "agg.bankaccount.ACC-1"
    assert naming.process_state_key("xfer", "T1") == "pm.xfer.T1"


@pytest.mark.parametrize(
    "subject",
    ["cc.events.a.b", "cc.events.a.b.c.d", "cc.commands.a.b.c", "xx.events.a.b.c", "", "cc.events"],
)
def test_parse_event_subject_rejects_other_subjects(subject):
    with pytest.raises(InvalidName, match="not an event subject"):
        parse_event_subject(subject)
