"""The permission sets as data, the configuration written from them, and secrets kept secret."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from concordance_provider.config import NatsOptions, SecretError, one_secret, read_secret_file, redact
from concordance_provider.manifest import load_manifest
from concordance_provider.permissions import (
    Application,
    Lattice,
    auditor,
    client,
    daemon,
    keyed_client,
    operator,
    refusal,
    subject_matches,
)

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "app.yaml"


@pytest.fixture(scope="module")
def bank() -> Application:
    return Application.of(spec.interest for spec in load_manifest(MANIFEST, need_files=False).components)


def test_the_application_names_its_aggregates_consumers_and_buckets(bank):
    assert bank.aggregates == ("bankaccount",)
    assert bank.buckets == ("CC_RM_bankaccount_projector", "CC_RM_otherbank_gateway")
    assert {(d.stream, d.name) for d in bank.durables} == {
        ("CC_COMMANDS", "AGG_CMD_bankaccount"), ("CC_EVENTS", "AGG_EVT_bankaccount"),
        ("CC_EVENTS", "PROJ_bankaccount_projector"), ("CC_EVENTS", "PM_interbankxfer"),
        ("CC_EVENTS", "NOTIFIER_otherbank_gateway")}


@pytest.mark.parametrize("pattern, subject, matches", [
    ("cc.commands.*", "cc.commands.bankaccount", True),
    ("cc.commands.*", "cc.commands.bankaccount.ABC123", False),
    ("cc.commands.*.*", "cc.commands.bankaccount.ABC123", True),
    ("$KV.CC_RESULTS.>", "$KV.CC_RESULTS.bankaccount.ABC123.7", True),
    ("$KV.CC_RESULTS.>", "$KV.CC_RESULTS", False),
    ("$JS.API.DIRECT.GET.KV_CC_STATE", "$JS.API.DIRECT.GET.KV_CC_STATE.$KV.CC_STATE.agg.x.y", False),
    ("_INBOX.>", "_INBOX_alice.abc", False),  # a token is matched whole
    ("cc.events.*.*.*.retry", "cc.events.funds_deposited.bankaccount.ABC123", False),
])
def test_subjects_match_as_nats_matches_them(pattern, subject, matches):
    assert subject_matches(pattern, subject) is matches


def _every(permissions) -> list[str]:
    return [*permissions.publish, *permissions.subscribe]


def test_nobody_gets_the_whole_api_and_only_the_operator_purges_and_only_what_replay_empties(bank):
    parties = {"daemon": daemon(bank), "client": client(bank, "_INBOX_c"), "auditor": auditor(bank, "_INBOX_a"),
               "operator": operator(bank, "_INBOX_o")}
    for name, permissions in parties.items():
        subjects = _every(permissions)
        assert not [s for s in subjects if s in (">", "$JS.>", "$JS.API.>", "$KV.>") or ".DELETE." in s
                    and "MSG.DELETE" not in s and "CONSUMER.DELETE" not in s], name
        purges = [s for s in subjects if ".PURGE." in s]
        if name == "operator":
            assert purges == ["$JS.API.STREAM.PURGE.KV_CC_RM_bankaccount_projector",
                              "$JS.API.STREAM.PURGE.KV_CC_RM_otherbank_gateway", "$JS.API.STREAM.PURGE.CC_DEADLETTER"]
        else:
            assert purges == [], name


def test_the_daemon_may_do_what_the_trace_showed_and_no_more_than_its_own_consumers(bank):
    needed = daemon(bank)
    for subject in ("$JS.API.CONSUMER.DURABLE.CREATE.CC_EVENTS.PROJ_bankaccount_projector",
                    "$JS.API.CONSUMER.MSG.NEXT.CC_COMMANDS.AGG_CMD_bankaccount",
                    "$JS.ACK.CC_EVENTS.PM_interbankxfer.1.5.5.1764230000.0",
                    "$JS.API.DIRECT.GET.KV_CC_RM_bankaccount_projector", "$KV.CC_RESULTS.bankaccount.ABC123.1",
                    "cc.events.wire_transfer_succeeded.interbank.WT-1001", "cc.commands.bankaccount.ABC123",
                    "cc.deadletter.AGG_CMD_bankaccount", "$JS.API.STREAM.INFO.CC_DEADLETTER"):
        assert needed.allows("publish", subject), subject
    for subject in ("$JS.API.CONSUMER.DURABLE.CREATE.CC_EVENTS.PROJ_someone_else", "$JS.API.STREAM.DELETE.CC_EVENTS",
                    "$KV.CC_DEPLOYED.x", "wasmbus.rpc.default.concordance.linkdefs.put"):
        assert not needed.allows("publish", subject), subject
    assert needed.allows("subscribe", "cc.commands.*.*") and needed.allow_responses
    assert not needed.allows("subscribe", "wasmbus.rpc.default.concordance.linkdefs.put")
    with_lattice = daemon(bank, Lattice(name="default"))
    assert with_lattice.allows("subscribe", "wasmbus.rpc.default.concordance.linkdefs.put")
    assert with_lattice.allows("publish", "cc.dispatch.default.abc")


def test_a_client_sends_to_its_aggregates_reads_and_writes_nothing_else(bank):
    c = client(bank, "_INBOX_alice")
    assert c.allows("publish", "cc.commands.bankaccount") and c.allows("publish", "cc.commands.bankaccount.ABC123")
    assert c.allows("publish", "$JS.API.DIRECT.GET.KV_CC_RESULTS.$KV.CC_RESULTS.*.*.4")
    assert c.allows("subscribe", "$KV.CC_RESULTS.bankaccount.ABC123.4")
    assert c.subscribe[0] == "_INBOX_alice.>" and not c.allows("subscribe", "_INBOX.>")
    for subject in ("cc.commands.payroll", "cc.events.funds_deposited.bankaccount.ABC123",
                    "$KV.CC_STATE.agg.bankaccount.ABC123", "$KV.CC_RESULTS.bankaccount.ABC123.4",
                    "$JS.API.CONSUMER.CREATE.CC_EVENTS", "$JS.API.CONSUMER.CREATE.KV_CC_RESULTS", "cc.status"):
        assert not c.allows("publish", subject), subject
    assert not c.allow_responses


def test_a_keyed_client_reaches_its_own_instances_only():
    c = keyed_client([("bankaccount", "ABC123")], "_INBOX_alice")
    assert c.allows("publish", "cc.commands.bankaccount.ABC123")
    assert c.allows("publish", "$JS.API.DIRECT.GET.KV_CC_RESULTS.$KV.CC_RESULTS.bankaccount.ABC123.7")
    assert c.allows("subscribe", "$KV.CC_RESULTS.bankaccount.ABC123.7")
    for subject in ("cc.commands.bankaccount", "cc.commands.bankaccount.XYZ", "$JS.API.DIRECT.GET.KV_CC_RESULTS",
                    "$JS.API.DIRECT.GET.KV_CC_RESULTS.$KV.CC_RESULTS.*.*.7", "$JS.API.DIRECT.GET.KV_CC_STATE"):
        assert not c.allows("publish", subject), subject
    assert not c.allows("subscribe", "$KV.CC_RESULTS.bankaccount.XYZ.7")


def test_the_auditor_reads_and_the_operator_retries_only_in_the_retry_form(bank):
    a, o = auditor(bank, "_INBOX_a"), operator(bank, "_INBOX_o")
    assert a.allows("publish", "$JS.API.DIRECT.GET.CC_DEADLETTER") and a.allows("publish", "cc.status")
    assert not [s for s in a.publish if not s.startswith(("$JS.API.STREAM.INFO.", "$JS.API.DIRECT.GET.", "cc.status"))]
    assert o.allows("publish", "cc.events.funds_deposited.bankaccount.ABC123.retry")
    assert not o.allows("publish", "cc.events.funds_deposited.bankaccount.ABC123")
    assert o.allows("publish", "$JS.API.CONSUMER.DELETE.CC_EVENTS.PROJ_bankaccount_projector")
    assert not o.allows("publish", "$JS.API.CONSUMER.DELETE.CC_COMMANDS.AGG_CMD_bankaccount")


def test_a_refusal_names_the_permission_in_its_own_case(bank):
    needed = daemon(bank)
    exact = refusal('nats: permissions violation for publish to "$js.api.stream.info.cc_deadletter"', needed)
    assert exact is not None and "may not publish to $JS.API.STREAM.INFO.CC_DEADLETTER" in exact
    wildcard = refusal('nats: permissions violation for publish to "$kv.cc_results.bankaccount.abc123.1"', needed)
    assert wildcard is not None and "grant publish on $KV.CC_RESULTS.>" in wildcard
    subscription = refusal('nats: permissions violation for subscription to "cc.status"', needed)
    assert subscription is not None and "may not subscribe to cc.status" in subscription
    unknown = refusal('nats: permissions violation for publish to "some.other"', needed)
    assert unknown is not None and "some.other" in unknown
    assert refusal("nats: timeout", needed) is None


@pytest.mark.parametrize("text, shown", [
    ("cannot reach nats://alice:s3cret@127.0.0.1:4222", "cannot reach nats://127.0.0.1:4222"),
    ("tls://u:p@host:1 and ws://x@y", "tls://host:1 and ws://y"),
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
])
def test_credentials_are_redacted_from_urls(text, shown):
    assert redact(text) == shown


def test_safe_url_hides_credentials_with_or_without_a_scheme():
    assert NatsOptions(url="nats://alice:s3cret@127.0.0.1:4222").safe_url == "nats://127.0.0.1:4222"
    assert NatsOptions(url="alice:s3cret@127.0.0.1:4222").safe_url == "127.0.0.1:4222"


def test_a_secret_comes_from_its_file_before_its_value(tmp_path):
    path = tmp_path / "password"
    path.write_text("from-the-file\nignored\n")
    assert one_secret("from-a-flag", path, "password").get_secret_value() == "from-the-file"
    assert one_secret("from-a-flag", None, "password").get_secret_value() == "from-a-flag"
    assert one_secret(None, None, "password") is None
    with pytest.raises(SecretError, match="cannot read"):
        read_secret_file(tmp_path / "missing", "password file")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecretError, match="is empty"):
        read_secret_file(tmp_path / "empty", "password file")


def _nats_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "concordance_provider.cli", "nats-config", str(MANIFEST), *args],
                          capture_output=True, text=True, timeout=60)


def test_nats_config_writes_private_files_and_never_prints_a_password(tmp_path):
    given = tmp_path / "client-secret"
    given.write_text("a-client-password\n")
    output = tmp_path / "conf" / "nats.conf"
    done = _nats_config("-o", str(output), "--client-user", "alice", "--client-password-file", str(given))
    assert done.returncode == 0, done.stderr
    secrets = tmp_path / "conf" / "nats-secrets"
    generated = {p.name: p.read_text().strip() for p in secrets.iterdir()}
    assert set(generated) == {"concordance.password", "operator.password", "auditor.password"}
    for path in (output, *secrets.iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    text = output.read_text()
    assert '"a-client-password"' in text and all(f'"{p}"' in text for p in generated.values())
    assert '"_INBOX_alice.>"' in text and '"$KV.CC_RM_otherbank_gateway.>"' in text
    printed = done.stdout + done.stderr
    assert "a-client-password" not in printed and not any(p in printed for p in generated.values())
    assert "inbox prefix _INBOX_alice" in printed
    again = _nats_config("-o", str(output), "--client-user", "alice", "--client-password-file", str(given))
    assert again.returncode == 0 and output.read_text() == text  # generated passwords are kept


def test_nats_config_refuses_a_user_name_that_is_not_a_token(tmp_path):
    done = _nats_config("-o", str(tmp_path / "nats.conf"), "--client-user", "a.b")
    assert done.returncode == 2 and "user name 'a.b' is not allowed" in done.stderr
    assert not (tmp_path / "nats.conf").exists() and not (tmp_path / "nats-secrets").exists()


def test_nats_config_refuses_a_missing_password_file(tmp_path):
    done = _nats_config("-o", str(tmp_path / "nats.conf"), "--daemon-password-file", str(tmp_path / "nope"))
    assert done.returncode == 2 and "cannot read it" in done.stderr and "Traceback" not in done.stderr


def test_generated_configuration_is_valid_for_nats_server(tmp_path):
    from concordance_provider.nats_server import server_binary

    output = tmp_path / "nats.conf"
    assert _nats_config("-o", str(output), "--lattice", "default").returncode == 0
    checked = subprocess.run([server_binary(), "-c", str(output), "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr + checked.stdout
    assert '"wasmbus.rpc.default.concordance.>"' in output.read_text()


def test_no_log_line_carries_the_credentials_of_a_url(capsys):
    import structlog

    from concordance_provider.logging import configure

    configure("info", "json")
    try:
        structlog.get_logger("test").warning("cannot reach", url="nats://alice:s3cret@127.0.0.1:1",
                                             error="tls://bob:hunter2@host:4443 refused")
        line = capsys.readouterr().err
    finally:
        structlog.reset_defaults()  # the configured logger writes to this test's captured stderr
    assert "nats://127.0.0.1:1" in line and "tls://host:4443" in line
    assert "s3cret" not in line and "hunter2" not in line


@pytest.mark.parametrize("given, error", [("payroll.ABC123", "no aggregate 'payroll' in the manifest"),
                                          ("bankaccount.A.B", "key 'A.B' is not allowed")])
def test_nats_config_refuses_a_client_key_it_cannot_grant(tmp_path, given, error):
    done = _nats_config("-o", str(tmp_path / "nats.conf"), "--client-key", given)
    assert done.returncode == 2 and error in done.stderr, done.stderr
