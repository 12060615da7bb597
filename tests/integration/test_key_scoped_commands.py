"""Commands scoped by key: ``cc.commands.{aggregate}.{key}`` beside ``cc.commands.{aggregate}``,
outcomes under ``{aggregate}.{key}.{seq}``, and a NATS user limited to one account by plain
permissions on those subjects."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from concordance_provider.nats_server import free_port, server_binary
from concordance_provider.store.jetstream import read_all
from concordance_provider.store.results import read_result

from .harness import DaemonProcess, client, example_manifest, kv_json, nats_server, result, send

pytestmark = pytest.mark.integration

READ_TIMEOUT = 1.0  # a refused request gets no answer: how long to wait for one


def create(account: str, balance: int = 1000) -> dict[str, Any]:
    return {"command_type": "create_account", "key": account,
            "data": {"accountNumber": account, "initialBalance": balance, "minBalance": 0, "customerId": "C"}}


def deposit(account: str, amount: int) -> dict[str, Any]:
    return {"command_type": "deposit_funds", "key": account,
            "data": {"accountNumber": account, "amount": amount, "customerId": "C"}}


async def balance(nc: NATS, account: str) -> int | None:
    state = await kv_json(nc, "CC_STATE", f"agg.bankaccount.{account}")
    return state["balance"] if state else None


# -- one server, no users: the subjects, the migration, the key check --------------------------

async def test_an_earlier_commands_stream_and_consumer_gain_the_key_subject_at_start(
        example_components, tmp_path: Path) -> None:
    with nats_server(tmp_path) as server:
        async with client(server.url) as nc:
            js = nc.jetstream()
            # CC_COMMANDS and AGG_CMD_bankaccount as the earlier scheme made them, with a command waiting
            await js.add_stream(StreamConfig(name="CC_COMMANDS", subjects=["cc.commands.*"], allow_direct=True,
                                             retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE))
            await js.add_consumer("CC_COMMANDS", ConsumerConfig(
                durable_name="AGG_CMD_bankaccount", filter_subject="cc.commands.bankaccount",
                ack_policy=AckPolicy.EXPLICIT))
            waiting = await send(nc, "bankaccount", create("KS1"))
            daemon = DaemonProcess(example_manifest(tmp_path, {}), tmp_path / "d.log", "--nats-url", server.url)
            try:
                daemon.wait_ready()
                stream = (await js.stream_info("CC_COMMANDS")).config
                assert sorted(stream.subjects) == ["cc.commands.*", "cc.commands.*.*"]
                consumer = (await js.consumer_info("CC_COMMANDS", "AGG_CMD_bankaccount")).config
                assert sorted(consumer.filter_subjects or []) == ["cc.commands.bankaccount",
                                                                  "cc.commands.bankaccount.*"]
                assert not consumer.filter_subject

                created = await result(nc, waiting, aggregate="bankaccount", key="KS1")
                assert created["status"] == "accepted", created
                # the key's subject and the aggregate's subject, mixed, in the order sent
                seqs = [await send(nc, "bankaccount", deposit("KS1", amount), key="KS1" if amount % 20 else None)
                        for amount in (10, 20, 30, 40)]
                outcomes = [await result(nc, seq, aggregate="bankaccount", key="KS1") for seq in seqs]
                assert [o["status"] for o in outcomes] == ["accepted"] * 4, outcomes
                assert await balance(nc, "KS1") == 1100
                events = await read_all(nc, "CC_EVENTS", "cc.events.*.bankaccount.KS1")
                causes = [e.headers["Concordance-Causation"] for e in events]
                assert causes == [f"command:{seq}" for seq in (waiting, *seqs)]
            finally:
                daemon.stop()


async def test_a_body_key_other_than_the_subject_key_is_rejected_undecided(example_components, tmp_path: Path) -> None:
    with nats_server(tmp_path) as server:
        async with client(server.url) as nc:
            daemon = DaemonProcess(example_manifest(tmp_path, {}), tmp_path / "d.log", "--nats-url", server.url)
            try:
                daemon.wait_ready()
                for account in ("KS1", "KS2"):
                    assert (await result(nc, await send(nc, "bankaccount", create(account), key=account)))[
                        "status"] == "accepted"

                mismatch = await send(nc, "bankaccount", deposit("KS2", 500), key="KS1")
                outcome = await result(nc, mismatch, aggregate="bankaccount", key="KS1")  # under the subject's key
                assert outcome["status"] == "rejected" and outcome["key"] == "KS1", outcome
                assert outcome["command_type"] == "deposit_funds", outcome
                assert "key mismatch" in outcome["error"] and "'KS2'" in outcome["error"], outcome
                assert await read_result(nc, mismatch, aggregate="bankaccount", key="KS2") is None
                assert await balance(nc, "KS2") == 1000 and await balance(nc, "KS1") == 1000  # never decided
                assert (await nc.jetstream().stream_info("CC_DEADLETTER")).state.messages == 0

                malformed = await send(nc, "bankaccount", b"{not json", key="KS1")
                outcome = await result(nc, malformed, aggregate="bankaccount", key="KS1")
                assert outcome["status"] == "rejected" and "malformed command" in outcome["error"], outcome

                unrouted = await send(nc, "nosuchaggregate", create("KS9"), key="KS9")
                outcome = await result(nc, unrouted, aggregate="nosuchaggregate", key="KS9")
                assert outcome["status"] == "rejected" and "no aggregate named" in outcome["error"], outcome
                keyless = await send(nc, "nosuchaggregate", b"{}")
                assert (await result(nc, keyless, aggregate="nosuchaggregate", key=None))["status"] == "rejected"
            finally:
                daemon.stop()


# -- a server with users: one client limited to one account ------------------------------------

DAEMON_USER, DAEMON_PASSWORD = "daemon", "daemon-secret"
ACCOUNT_USER, ACCOUNT_PASSWORD = "abc123", "abc123-secret"
CLI_USER, CLI_PASSWORD = "abc123cli", "abc123cli-secret"
INBOX = "_INBOX_abc123"
RESULTS_READ = "$KV.CC_RESULTS.bankaccount.ABC123.>"

# What a client needs to send commands for ABC123 and read their outcomes, and nothing more: its
# command subject, the direct get of its own outcomes (the subject is part of the API subject),
# its own inbox for the replies, and its outcomes' subject to wait for one as it is written.
ACCOUNT_PERMISSIONS = {
    "publish": {"allow": ["cc.commands.bankaccount.ABC123", f"$JS.API.DIRECT.GET.KV_CC_RESULTS.{RESULTS_READ}"]},
    "subscribe": {"allow": [f"{INBOX}.>", RESULTS_READ]},
}
# `concordance send` with the default inbox prefix
CLI_PERMISSIONS = {
    "publish": ACCOUNT_PERMISSIONS["publish"],
    "subscribe": {"allow": ["_INBOX.>", RESULTS_READ]},
}


def server_config(store: Path, port: int) -> str:
    users = [{"user": DAEMON_USER, "password": DAEMON_PASSWORD},
             {"user": ACCOUNT_USER, "password": ACCOUNT_PASSWORD, "permissions": ACCOUNT_PERMISSIONS},
             {"user": CLI_USER, "password": CLI_PASSWORD, "permissions": CLI_PERMISSIONS}]
    # the configuration format takes JSON values
    return (f"listen: \"127.0.0.1:{port}\"\n"
            f"jetstream: {{store_dir: {json.dumps(str(store))}}}\n"
            f"accounts: {{APP: {{jetstream: enabled, users: {json.dumps(users)}}}}}\n")


class ServerWithUsers:
    """nats-server on loopback with the configuration above, stopped by its PID."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = folder / "nats.conf"
        config.write_text(server_config(folder / "jetstream", self.port))
        self._log = (folder / "nats.log").open("wb")
        self.process = subprocess.Popen([server_binary(), "-c", str(config)], stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not self._listening():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"nats-server did not start:\n{(folder / 'nats.log').read_text()}")
            time.sleep(0.05)

    def url(self, user: str, password: str) -> str:
        return f"nats://{user}:{password}@127.0.0.1:{self.port}"

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class Refusals:
    """The permission violations the server reported to one client."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def record(self, error: Exception) -> None:
        self.errors.append(str(error))

    async def of(self, subject: str, what: str = "Publish") -> bool:
        """Whether the server refused ``subject`` since the last look (it says so shortly after the
        attempt; nats-py reports the error in lower case)."""
        expected = f'permissions violation for {what} to "{subject}"'.lower()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if any(expected in error.lower() for error in self.errors):
                self.errors.clear()
                return True
            await asyncio.sleep(0.02)
        return False


async def connect(url: str, refusals: Refusals) -> NATS:
    return await nats.connect(url, inbox_prefix=INBOX, error_cb=refusals.record, max_reconnect_attempts=0)


async def refused_request(nc: NATS, subject: str, data: bytes) -> None:
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(subject, data, timeout=READ_TIMEOUT)


@pytest.fixture
async def secured(example_components, tmp_path: Path) -> AsyncIterator[ServerWithUsers]:
    server = ServerWithUsers(tmp_path / "nats")
    daemon = DaemonProcess(example_manifest(tmp_path, {}), tmp_path / "d.log",
                           "--nats-url", f"nats://127.0.0.1:{server.port}",
                           env={"NATS_USER": DAEMON_USER, "NATS_PASSWORD": DAEMON_PASSWORD})
    try:
        daemon.wait_ready()
        yield server
    finally:
        daemon.stop()
        server.stop()


async def test_a_client_allowed_one_account_acts_on_it_and_on_nothing_else(secured: ServerWithUsers) -> None:
    admin = await nats.connect(secured.url(DAEMON_USER, DAEMON_PASSWORD))
    refusals = Refusals()
    nc = await connect(secured.url(ACCOUNT_USER, ACCOUNT_PASSWORD), refusals)
    try:
        other = await send(admin, "bankaccount", create("OTHER", 5000))
        assert (await result(admin, other))["status"] == "accepted"

        # its own account: send, and read the outcome where its key's outcomes are
        created = await send(nc, "bankaccount", create("ABC123", 4000), key="ABC123")
        deposited = await send(nc, "bankaccount", deposit("ABC123", 3000), key="ABC123")
        for seq in (created, deposited):
            outcome = json.loads(await read_result(nc, seq, aggregate="bankaccount", key="ABC123", wait=30) or b"{}")
            assert outcome.get("status") == "accepted", outcome
        assert await balance(admin, "ABC123") == 7000
        assert not refusals.errors

        # another account's subject, and the aggregate's subject with any body: refused by the server
        stored_before = (await admin.jetstream().stream_info("CC_COMMANDS")).state.last_seq
        attempts = [("cc.commands.bankaccount.OTHER", deposit("OTHER", 1)),
                    ("cc.commands.bankaccount", deposit("OTHER", 1)),
                    ("cc.commands.bankaccount", deposit("ABC123", 1))]
        for subject, body in attempts:
            await refused_request(nc, subject, json.dumps(body).encode())
            assert await refusals.of(subject), (subject, refusals.errors)
        assert (await admin.jetstream().stream_info("CC_COMMANDS")).state.last_seq == stored_before
        assert await balance(admin, "OTHER") == 5000 and await balance(admin, "ABC123") == 7000

        # another account's outcome: not by its key, by its seq alone, by a wildcard, nor by watching it
        for reader, pattern in ((dict(aggregate="bankaccount", key="OTHER"), f"bankaccount.OTHER.{other}"),
                                ({}, f"*.*.{other}")):
            with pytest.raises(nats.errors.TimeoutError):
                await read_result(nc, other, timeout=READ_TIMEOUT, **reader)
            assert await refusals.of(f"$JS.API.DIRECT.GET.KV_CC_RESULTS.$KV.CC_RESULTS.{pattern}"), refusals.errors
        for pattern in (f"bankaccount.*.{other}", ">"):
            subject = f"$JS.API.DIRECT.GET.KV_CC_RESULTS.$KV.CC_RESULTS.{pattern}"
            await refused_request(nc, subject, b"")
            assert await refusals.of(subject), refusals.errors
        await refused_request(nc, "$JS.API.DIRECT.GET.KV_CC_RESULTS", json.dumps({"seq": other}).encode())
        assert await refusals.of("$JS.API.DIRECT.GET.KV_CC_RESULTS"), refusals.errors
        await nc.subscribe("$KV.CC_RESULTS.bankaccount.OTHER.>")
        assert await refusals.of("$KV.CC_RESULTS.bankaccount.OTHER.>", "Subscription"), refusals.errors
        assert nc.is_connected  # refusals end nothing: its own account still works
        again = await send(nc, "bankaccount", deposit("ABC123", 1), key="ABC123")
        assert json.loads(await read_result(nc, again, aggregate="bankaccount", key="ABC123", wait=30) or b"{}")[
            "status"] == "accepted"
    finally:
        await nc.close()
        await admin.close()


def cli_send(url: str, body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "NATS_USER": CLI_USER, "NATS_PASSWORD": CLI_PASSWORD}
    return subprocess.run([sys.executable, "-m", "concordance_provider.cli", "send", "bankaccount", json.dumps(body),
                           "--nats-url", url, "--wait", "30"], capture_output=True, text=True, timeout=120, env=env)


async def test_concordance_send_works_with_the_one_account_permissions(secured: ServerWithUsers) -> None:
    url = f"nats://127.0.0.1:{secured.port}"
    sent = cli_send(url, create("ABC123", 4000))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert json.loads(sent.stdout)["status"] == "accepted"
    refused = cli_send(url, create("OTHER", 4000))
    assert refused.returncode != 0, refused.stdout
    async with client(secured.url(DAEMON_USER, DAEMON_PASSWORD)) as admin:
        assert await balance(admin, "OTHER") is None and await balance(admin, "ABC123") == 4000
