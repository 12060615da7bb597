"""The generated nats-server configuration: the daemon serves the bank example under its own
permissions, each party is held to its set, and a missing permission stops the daemon clearly."""

from __future__ import annotations

import asyncio
import json
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nats
import pytest

from concordance_provider.nats_server import free_port

from .harness import DaemonProcess, configured_nats_server, eventually, example_manifest, kv_json, ledger, logged

pytestmark = pytest.mark.integration

COMMANDS = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "commands"
WALKTHROUGH = ("create_account_cmd", "deposit_cmd_1", "deposit_cmd_2", "withdraw_cmd_1",
               "wire_cmd_commits", "wire_cmd_released")


@dataclass
class Secured:
    url: str
    config: Path
    secrets: Path
    server_log: Path

    def password(self, user: str) -> str:
        return (self.secrets / f"{user}.password").read_text().strip()

    def login(self, user: str) -> list[str]:
        """The client commands' options for ``user``: its password file and its own inboxes."""
        return ["--user", user, "--password-file", str(self.secrets / f"{user}.password"),
                "--inbox-prefix", f"_INBOX_{user}"]

    def violations(self) -> list[str]:
        return [line for line in self.server_log.read_text().splitlines() if "Violation" in line]


def concordance(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "concordance_provider.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def _generate(tmp_path: Path, manifest: Path) -> tuple[Path, int]:
    port = free_port()
    config = tmp_path / "nats.conf"
    done = concordance("nats-config", str(manifest), "-o", str(config), "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 0, done.stderr
    return config, port


@contextmanager
def serving(tmp_path: Path, config: Path, port: int) -> Iterator[Secured]:
    """nats-server run with ``config``, logging to a file; stopped by its PID."""
    log = tmp_path / "nats-server.log"
    with configured_nats_server(config, port, log):
        yield Secured(f"nats://127.0.0.1:{port}", config, tmp_path / "nats-secrets", log)


def start_daemon(secured: Secured, manifest: Path, log: Path) -> DaemonProcess:
    """``up`` as README shows it: the password in a file, nothing secret on the command line."""
    return DaemonProcess(manifest, log, "--nats-url", secured.url, "--user", "concordance",
                         "--password-file", str(secured.secrets / "concordance.password"))


async def _refused(nc: nats.aio.client.Client, errors: list[str], attempt, subject: str) -> None:  # type: ignore[no-untyped-def]
    """Run ``attempt``; the server must answer it with a permissions violation naming ``subject``.
    A refused request is dropped by the server: only the violation answers it, so the request is
    given up once the violation has come (or after 5 s), not waited out."""
    before = len(errors)
    trying = asyncio.ensure_future(attempt())
    try:
        deadline = time.monotonic() + 5
        while len(errors) == before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        if not trying.done():
            trying.cancel()
        try:
            await trying
        except (nats.errors.TimeoutError, asyncio.TimeoutError, asyncio.CancelledError):
            pass
    assert any(subject.lower() in e for e in errors[before:]), f"{subject} was not refused: {errors[before:]}"


async def test_generated_configuration_runs_the_bank_example_and_holds_each_party_to_its_set(
        example_components, tmp_path):
    manifest = example_manifest(tmp_path, {})
    config, port = _generate(tmp_path, manifest)
    assert config.stat().st_mode & 0o777 == 0o600
    with serving(tmp_path, config, port) as secured:
        daemon = start_daemon(secured, manifest, tmp_path / "daemon.log")
        try:
            daemon.wait_ready()
            cmdline = Path(f"/proc/{daemon.process.pid}/cmdline").read_bytes()
            assert b"--password-file" in cmdline and secured.password("concordance").encode() not in cmdline

            for command in WALKTHROUGH:  # the client, as a user runs it
                sent = concordance("send", "bankaccount", f"@{COMMANDS / command}.json", "--nats-url", secured.url,
                                   *secured.login("client"))
                assert sent.returncode == 0, (command, sent.stdout, sent.stderr)

            client = await nats.connect(secured.url, user="client", password=secured.password("client"),
                                        inbox_prefix="_INBOX_client")
            try:
                account = await eventually(lambda: kv_json(client, "CC_STATE", "agg.bankaccount.ABC123"),
                                           lambda state: state and state["balance"] == 4500
                                           and not state.get("reservedFunds"))
                assert account["balance"] == 4500, account
                entries = await eventually(lambda: ledger(client, "ABC123"), lambda found: len(found) == 8)
                assert [e["event"] for e in entries][-4:] == ["funds_reserved", "funds_committed",
                                                              "funds_reserved", "funds_released"]
            finally:
                await client.close()

            reads = {"client": [("state", "bankaccount", "ABC123"), ("events", "--key", "ABC123"),
                                ("readmodel", "bankaccount_projector", "balance.ABC123"), ("result", "1")],
                     "auditor": [("status", "--json"), ("events", "--stream", "interbank"), ("deadletters", "list")],
                     "operator": [("deadletters", "list"), ("status", "--json"), ("deadletters", "purge", "--yes"),
                                  ("rebuild", str(manifest), "bankaccount.ABC123"),
                                  ("replay", str(manifest), "bankaccount_projector", "--from-seq", "3", "--no-wait")]}
            for user, commands in reads.items():
                for args in commands:
                    done = concordance(*args, "--nats-url", secured.url, *secured.login(user))
                    assert done.returncode == 0, (user, args, done.stdout, done.stderr)
            assert _follows_one_event(secured, "auditor") == "account_created"
            assert secured.violations() == []
            for args, subject in ((("deadletters", "list"), ".cc_deadletter"),
                                  (("status",), "cc.status")):  # an auditor's reads, not a client's
                done = concordance(*args, "--nats-url", secured.url, *secured.login("client"))
                assert done.returncode == 2 and done.stderr.startswith("error: NATS refused this user") \
                    and subject in done.stderr and "Traceback" not in done.stderr, done.stderr
            assert not [e for e in daemon.logs() if e.get("event") == "NATS error"], daemon.log_path.read_text()

            await _forbidden_to_a_client(secured)
            # none of it reached the daemon or changed anything
            assert all("/user:client\"" in line for line in secured.violations()), secured.violations()
            assert daemon.process.poll() is None
            auditor = await nats.connect(secured.url, user="auditor", password=secured.password("auditor"),
                                         inbox_prefix="_INBOX_auditor")
            try:
                assert (await kv_json(auditor, "CC_STATE", "agg.bankaccount.ABC123"))["balance"] == 4500
                info = await auditor.jetstream().stream_info("CC_EVENTS")
                assert info.state.messages > 0
            finally:
                await auditor.close()
        finally:
            daemon.stop()
        assert secured.password("concordance") not in daemon.log_path.read_text()


def _follows_one_event(secured: Secured, user: str) -> str:
    """`events --follow` as ``user``: the type of the first event it prints, then stopped with Ctrl-C."""
    follower = subprocess.Popen([sys.executable, "-m", "concordance_provider.cli", "events", "--follow", "--json",
                                 "--nats-url", secured.url, *secured.login(user)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        ready, _, _ = select.select([follower.stdout], [], [], 60)
        assert ready, "events --follow printed nothing within 60s"
        first = follower.stdout.readline()  # the history comes first: the account's creation
        time.sleep(1.0)  # then it follows, looking for new events a few times before Ctrl-C
        follower.send_signal(signal.SIGINT)
        assert follower.wait(30) == 0, follower.stderr.read() if follower.stderr else ""
        return str(json.loads(first)["type"])
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


async def _forbidden_to_a_client(secured: Secured) -> None:
    errors: list[str] = []

    async def collect(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(secured.url, user="client", password=secured.password("client"),
                            inbox_prefix="_INBOX_client", error_cb=collect)
    forged = json.dumps({"specversion": "1.0", "id": "x", "source": "mallory", "type": "funds_deposited",
                         "datacontenttype": "application/json",
                         "data": {"accountNumber": "ABC123", "amount": 1000000}}).encode()

    def request(subject: str, body: bytes = b"{}"):  # type: ignore[no-untyped-def]
        return lambda: nc.request(subject, body, timeout=1)

    async def subscribe(subject: str) -> None:
        await nc.subscribe(subject)

    try:
        cases = [
            (request("cc.events.funds_deposited.bankaccount.ABC123", forged), "cc.events.funds_deposited.bankaccount.ABC123"),
            (request("$KV.CC_STATE.agg.bankaccount.ABC123", b'{"balance": 1}'), "$KV.CC_STATE.agg.bankaccount.ABC123"),
            (request("$KV.CC_RESULTS.bankaccount.ABC123.99", b'{"status": "accepted"}'), "$KV.CC_RESULTS.bankaccount.ABC123.99"),
            (request("$KV.CC_RM_bankaccount_projector.balance.ABC123"), "$KV.CC_RM_bankaccount_projector.balance.ABC123"),
            (request("cc.commands.payroll", b'{"command_type": "x", "key": "k", "data": {}}'), "cc.commands.payroll"),
            (request("$JS.API.STREAM.DELETE.CC_EVENTS"), "$JS.API.STREAM.DELETE.CC_EVENTS"),
            (request("$JS.API.STREAM.PURGE.CC_EVENTS"), "$JS.API.STREAM.PURGE.CC_EVENTS"),
            (request("$JS.API.STREAM.PURGE.KV_CC_STATE"), "$JS.API.STREAM.PURGE.KV_CC_STATE"),
            (request("$JS.API.STREAM.MSG.DELETE.CC_COMMANDS", b'{"seq": 1}'), "$JS.API.STREAM.MSG.DELETE.CC_COMMANDS"),
            (request("$JS.API.STREAM.UPDATE.CC_EVENTS"), "$JS.API.STREAM.UPDATE.CC_EVENTS"),
            # an "ephemeral" consumer named as the projector's durable would rewrite it
            (request("$JS.API.CONSUMER.CREATE.CC_EVENTS", json.dumps({"stream_name": "CC_EVENTS", "config": {
                "name": "PROJ_bankaccount_projector", "ack_policy": "explicit", "filter_subject": "cc.events.none.>"}
            }).encode()), "$JS.API.CONSUMER.CREATE.CC_EVENTS"),
            (lambda: subscribe("_INBOX.>"), "_INBOX.>"),  # other users' replies
            (lambda: subscribe("cc.commands.*"), "cc.commands.*"),  # other users' commands
            (lambda: subscribe("cc.status"), "cc.status"),
        ]
        for attempt, subject in cases:
            await _refused(nc, errors, attempt, subject)
    finally:
        await nc.close()


@pytest.mark.parametrize("lacking, when", [
    ("$JS.API.STREAM.INFO.CC_DEADLETTER", "at start"),
    ("$KV.CC_RESULTS.>", "at the first command"),
])
async def test_a_daemon_missing_one_permission_stops_naming_it(example_components, tmp_path, lacking, when):
    manifest = example_manifest(tmp_path, {})
    config, port = _generate(tmp_path, manifest)
    text = config.read_text()
    line = f'            "{lacking}",\n'
    assert line in text
    config.write_text(text.replace(line, "", 1))  # the daemon's user comes first
    with serving(tmp_path, config, port) as secured:
        daemon = start_daemon(secured, manifest, tmp_path / "daemon.log")
        try:
            if when == "at the first command":
                daemon.wait_ready()
                sent = concordance("send", "bankaccount", f"@{COMMANDS / 'create_account_cmd.json'}", "--wait", "0",
                                   "--nats-url", secured.url, *secured.login("client"))
                assert sent.returncode == 0, sent.stderr
            code = daemon.process.wait(90)
        finally:
            daemon.stop()
        output = daemon.log_path.read_text()
        assert code == 2, output
        error = [line for line in output.splitlines() if line.startswith("error: ")]
        assert error and lacking in error[-1] and "may not publish" in error[-1], output
        assert sum("NATS refused a permission" in line for line in output.splitlines()) == 1, output
        # the request under way when the violation came times out once; nothing is retried after it
        assert sum("nats: timeout" in line for line in output.splitlines()) <= 1, output


async def test_credentials_in_a_url_stay_out_of_errors_and_logs(example_components, tmp_path):
    manifest = example_manifest(tmp_path, {})
    config, port = _generate(tmp_path, manifest)
    with serving(tmp_path, config, port) as secured:
        wrong = "wrong-" + secured.password("concordance")
        refused = concordance("up", str(manifest), "--log-format", "json",
                              "--nats-url", f"nats://concordance:{wrong}@127.0.0.1:{port}")
        assert refused.returncode == 2 and "authorization" in refused.stderr.lower(), refused.stderr
        assert wrong not in refused.stdout + refused.stderr
        closed = free_port()
        for args in (("status",), ("state", "bankaccount", "ABC123")):
            done = concordance(*args, "--nats-url", f"nats://client:{wrong}@127.0.0.1:{closed}")
            assert done.returncode == 2 and "127.0.0.1" in done.stderr, done.stderr
            assert wrong not in done.stdout + done.stderr
        # the daemon waits for a server that is not up yet, logging each refused connection
        waiting = DaemonProcess(manifest, tmp_path / "waiting.log", "--nats-url",
                                f"nats://concordance:{wrong}@127.0.0.1:{closed}")
        try:
            await logged(waiting, "NATS error", count=2, timeout=60)
        finally:
            waiting.process.kill()  # by its PID; it is not connected, so nothing is left unsettled
            waiting.stop()
        assert f"127.0.0.1', {closed}" in waiting.log_path.read_text()
        assert wrong not in waiting.log_path.read_text()


async def test_a_client_held_to_one_key_sends_its_commands_and_nothing_else(example_components, tmp_path):
    manifest = example_manifest(tmp_path, {})
    port = free_port()
    config = tmp_path / "nats.conf"
    done = concordance("nats-config", str(manifest), "-o", str(config), "--listen", f"127.0.0.1:{port}",
                       "--client-key", "bankaccount.ABC123")
    assert done.returncode == 0, done.stderr
    with serving(tmp_path, config, port) as secured:
        daemon = start_daemon(secured, manifest, tmp_path / "daemon.log")
        try:
            daemon.wait_ready()
            sent = concordance("send", "bankaccount", f"@{COMMANDS / 'create_account_cmd.json'}",
                               "--nats-url", secured.url, *secured.login("client"))
            assert sent.returncode == 0 and '"accepted"' in sent.stdout, sent.stdout + sent.stderr
            started = time.monotonic()
            other = concordance("send", "bankaccount", json.dumps({"command_type": "create_account", "key": "XYZ",
                                "data": {"accountNumber": "XYZ", "initialBalance": 1, "customerId": "C"}}),
                                "--nats-url", secured.url, *secured.login("client"))
            assert other.returncode == 2 and 'publish to "cc.commands.bankaccount.xyz"' in other.stderr, other.stderr
            # it fails as the server refuses, not after the publish's 5 s wait for an answer
            assert time.monotonic() - started < 4.0
            read = concordance("state", "bankaccount", "ABC123", "--nats-url", secured.url, *secured.login("client"))
            assert read.returncode == 2 and "NATS refused this user" in read.stderr, read.stderr

            errors: list[str] = []

            async def collect(exc: Exception) -> None:
                errors.append(str(exc))

            nc = await nats.connect(secured.url, user="client", password=secured.password("client"),
                                    inbox_prefix="_INBOX_client", error_cb=collect)
            try:
                for attempt, subject in [
                    (lambda: nc.request("cc.commands.bankaccount", b"{}", timeout=1), "cc.commands.bankaccount"),
                    (lambda: nc.request("$JS.API.DIRECT.GET.KV_CC_RESULTS.$KV.CC_RESULTS.bankaccount.XYZ.1", b"",
                                        timeout=1), "$JS.API.DIRECT.GET.KV_CC_RESULTS.$KV.CC_RESULTS.bankaccount.XYZ.1"),
                    (lambda: nc.subscribe("$KV.CC_RESULTS.bankaccount.XYZ.>"), "$KV.CC_RESULTS.bankaccount.XYZ.>"),
                ]:
                    await _refused(nc, errors, attempt, subject)
            finally:
                await nc.close()
            assert daemon.process.poll() is None
        finally:
            daemon.stop()
