"""The `concordance` command as a user types it, against a real daemon and its own NATS server:
the read commands (`state`, `events`, `result`, `readmodel`) and how every client command fails."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from concordance_provider import __version__
from concordance_provider.nats_server import free_port
from concordance_provider.store.results import read_result

from .harness import DaemonProcess, client, kv_json, quiescent, result, send

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "examples" / "bankaccount" / "app.yaml"
COMMANDS = ROOT / "examples" / "bankaccount" / "commands"
REFUSED_WITHIN = 3.0  # seconds, Python's start included


def cli(*args: str, url: str | None = None, stdin: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("NATS_URL", None)
    if url is not None:
        env["NATS_URL"] = url
    return subprocess.run([sys.executable, "-m", "concordance_provider.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, input=stdin)


@pytest.fixture(scope="module")
def url(example_components, tmp_path_factory):
    """`concordance up` with its embedded server, as after `make run`."""
    tmp = tmp_path_factory.mktemp("cli")
    port = free_port()
    process = DaemonProcess(MANIFEST, tmp / "daemon.log", "--state-dir", str(tmp / "state"), "--port", str(port))
    try:
        process.wait_ready()
        yield f"nats://127.0.0.1:{port}"
    finally:
        assert process.stop() == 0


def _deposit(key: str, amount: int) -> dict:
    return {"command_type": "deposit_funds", "key": key,
            "data": {"accountNumber": key, "amount": amount, "customerId": "C"}}


def _create(key: str) -> dict:
    return {"command_type": "create_account", "key": key,
            "data": {"accountNumber": key, "initialBalance": 100, "customerId": "C"}}


def _causes(table: str) -> list[int]:
    """The command sequences in the CAUSE column of an `events` table."""
    rows = [line.split() for line in table.splitlines()[1:]]
    return [int(row[6].split(":")[1]) for row in rows if row[6].startswith("command:")]


async def test_the_walkthrough_to_a_finished_wire_transfer_needs_only_concordance(url):
    """The README's walkthrough: the original four commands, then a transfer that commits and one
    that is released, every outcome, state, event and read model read with `concordance`."""
    outcomes = []
    for name in ("create_account_cmd", "deposit_cmd_1", "deposit_cmd_2", "withdraw_cmd_1"):
        sent = cli("send", "bankaccount", f"@{COMMANDS / name}.json", url=url)
        assert sent.returncode == 0, sent.stderr
        outcomes.append(json.loads(sent.stdout))
    assert [o["status"] for o in outcomes] == ["accepted"] * 4

    async with client(url) as nc:
        stored_state = (await (await nc.jetstream().key_value("CC_STATE")).get("agg.bankaccount.ABC123")).value
        stored_result = await read_result(nc, outcomes[3]["seq"], aggregate="bankaccount", key="ABC123")
    state = cli("state", "bankaccount", "ABC123", "--json", url=url)
    assert state.returncode == 0 and state.stdout.encode() == stored_state + b"\n"  # exactly the stored object
    assert json.loads(state.stdout)["balance"] == 6000
    shown = cli("state", "bankaccount", "ABC123", url=url)
    assert shown.stdout.startswith("agg.bankaccount.ABC123, up to event ") and '\n  "balance": 6000,\n' in shown.stdout

    outcome = cli("result", str(outcomes[3]["seq"]), url=url)
    assert outcome.returncode == 0
    assert outcome.stdout == (f"command {outcomes[3]['seq']} (bankaccount ABC123 withdraw_funds): accepted, "
                              f"events: funds_withdrawn\n")
    assert cli("result", str(outcomes[3]["seq"]), "--json", url=url).stdout.encode() == stored_result + b"\n"

    lines = cli("events", "--key", "ABC123", "--json", url=url).stdout.splitlines()
    assert [json.loads(line)["type"] for line in lines] == [
        "account_created", "funds_deposited", "funds_deposited", "funds_withdrawn"]
    assert all(json.loads(line)["specversion"] == "1.0" for line in lines)
    table = cli("events", "--stream", "bankaccount", "--key", "ABC123", url=url).stdout.splitlines()
    assert table[0].split() == ["SEQ", "TIME", "TYPE", "STREAM", "KEY", "CAUSE", "DATA"] and len(table) == 5

    for name in ("wire_cmd_commits", "wire_cmd_released"):
        sent = cli("send", "bankaccount", f"@{COMMANDS / name}.json", url=url)
        assert sent.returncode == 0 and json.loads(sent.stdout)["events"] == ["wire_transfer_initiated"], sent.stdout
    async with client(url) as nc:
        await quiescent(nc)

    state = json.loads(cli("state", "bankaccount", "ABC123", "--json", url=url).stdout)
    assert state["balance"] == 4500 and state["reservedFunds"] == {}  # 1500 left, 2500 came back
    answers = [json.loads(line) for line in
               cli("events", "--stream", "interbank", "--json", url=url).stdout.splitlines()]
    assert sorted((a["subject"], a["type"]) for a in answers) == [
        ("WT-1001", "wire_transfer_succeeded"), ("WT-1002", "wire_transfer_failed")]
    account = [json.loads(line)["type"] for line in
               cli("events", "--key", "ABC123", "--json", url=url).stdout.splitlines()]
    assert Counter(account[4:]) == Counter({"wire_transfer_initiated": 2, "funds_reserved": 2,
                                            "funds_committed": 1, "funds_released": 1})

    # the process manager's commands, found from the events they caused, and their outcomes
    commit = cli("events", "--type", "funds_committed", url=url).stdout
    release = cli("events", "--type", "funds_released", url=url).stdout
    assert "WT-1001" in commit and "WT-1002" in release
    for table, command_type in ((commit, "commit_funds"), (release, "release_funds")):
        (seq,) = _causes(table)
        assert f"(bankaccount ABC123 {command_type}): accepted" in cli("result", str(seq), url=url).stdout
    ended = cli("state", "interbankxfer", "WT-1001", "--process-manager", url=url)
    assert ended.returncode == 1 and "its process has ended" in ended.stderr

    balance = cli("readmodel", "bankaccount_projector", "balance.ABC123", "--json", url=url)
    assert json.loads(balance.stdout)["balance"] == 4500
    ledger = json.loads(cli("readmodel", "bankaccount_projector", "ledger.ABC123.>", "--json", url=url).stdout)
    assert [entry["balance"] for entry in ledger.values()][-1] == 4500 and len(ledger) == 8
    listing = cli("readmodel", "bankaccount_projector", url=url).stdout.splitlines()
    assert listing[0].split() == ["KEY", "VALUE"] and listing[1].startswith("balance.ABC123 ")
    assert listing[-1].startswith("(PROJ_bankaccount_projector has applied events up to ")


async def test_result_waits_and_tells_rejected_and_unknown_apart(url):
    async with client(url) as nc:
        await result(nc, await send(nc, "bankaccount", _create("RES1")))
    sent = cli("send", "bankaccount", json.dumps(_deposit("RES1", 5)), "--wait", "0", url=url)
    waited = cli("result", str(json.loads(sent.stdout)["seq"]), "--wait", url=url)
    assert waited.returncode == 0 and "accepted, events: funds_deposited" in waited.stdout

    rejected = cli("send", "bankaccount", json.dumps({"command_type": "withdraw_funds", "key": "RES1", "data": {
        "accountNumber": "RES1", "amount": 10**6, "customerId": "C"}}), url=url)
    assert rejected.returncode == 1
    shown = cli("result", str(json.loads(rejected.stdout)["seq"]), url=url)
    assert shown.returncode == 1 and ": rejected: insufficient funds" in shown.stdout

    unknown = cli("result", "999999", url=url)
    assert unknown.returncode == 3 and unknown.stdout == ""
    assert unknown.stderr.startswith("no outcome for command 999999: there is no command 999999 yet")


async def test_state_and_readmodel_say_what_is_not_there(url):
    missing = cli("state", "bankaccount", "NOBODY", url=url)
    assert missing.returncode == 1 and "no such instance" in missing.stderr and missing.stdout == ""
    wildcard = cli("state", "bankaccount", "*", url=url)
    assert wildcard.returncode == 2 and "key '*' is not allowed" in wildcard.stderr
    no_key = cli("readmodel", "bankaccount_projector", "balance.NOBODY", url=url)
    assert no_key.returncode == 1 and "no key balance.NOBODY" in no_key.stderr
    no_model = cli("readmodel", "nobody", url=url)
    assert no_model.returncode == 2 and "no read model in bucket CC_RM_nobody" in no_model.stderr


async def test_events_since_a_sequence_or_an_age(url):
    async with client(url) as nc:
        seqs = [await send(nc, "bankaccount", _create("SINCE1"))]
        seqs += [await send(nc, "bankaccount", _deposit("SINCE1", n)) for n in (1, 2, 3)]
        for seq in seqs:
            await result(nc, seq)
    every = [json.loads(line) for line in cli("events", "--key", "SINCE1", "--json", url=url).stdout.splitlines()]
    table = cli("events", "--key", "SINCE1", url=url).stdout.splitlines()
    third_seq = int(table[3].split()[0])
    later = cli("events", "--key", "SINCE1", "--since", str(third_seq), "--json", url=url).stdout.splitlines()
    assert [json.loads(line)["id"] for line in later] == [e["id"] for e in every[2:]]
    assert len(cli("events", "--key", "SINCE1", "--since", "1h", "--json", url=url).stdout.splitlines()) == 4
    future = cli("events", "--key", "SINCE1", "--since", "2999-01-01T00:00:00Z", "--json", url=url)
    assert future.stdout == "" and "no events" in future.stderr
    deposits = cli("events", "--key", "SINCE1", "--type", "FundsDeposited", "--json", url=url).stdout.splitlines()
    assert [json.loads(line)["data"]["amount"] for line in deposits] == [1, 2, 3]


async def test_events_follow_prints_each_new_event_once_until_stopped(url):
    async with client(url) as nc:
        await result(nc, await send(nc, "bankaccount", _create("FOLLOW1")))  # before: from the history
        env = {**os.environ, "NATS_URL": url}
        follower = subprocess.Popen([sys.executable, "-m", "concordance_provider.cli", "events", "--key", "FOLLOW1",
                                     "--follow", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env)
        output = _Lines(follower)
        try:
            first = output.take(1, timeout=30)
            for amount in (7, 8):  # after: followed
                await result(nc, await send(nc, "bankaccount", _deposit("FOLLOW1", amount)))
            lines = first + output.take(2, timeout=30)
        finally:
            follower.send_signal(signal.SIGINT)
            code = follower.wait(15)
    events = [json.loads(line) for line in lines]
    assert [e["type"] for e in events] == ["account_created", "funds_deposited", "funds_deposited"]
    assert [e["data"].get("amount") for e in events[1:]] == [7, 8]
    assert code == 0 and output.rest() == []  # nothing twice


class _Lines:
    """A process's stdout, line by line, read on a thread so that waiting for a line can time out."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._lines.put(line) for line in process.stdout], daemon=True).start()

    def take(self, count: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        taken = []
        while len(taken) < count and time.monotonic() < deadline:
            try:
                taken.append(self._lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        assert len(taken) == count, taken
        return taken

    def rest(self) -> list[str]:
        return list(self._lines.queue)


async def test_send_checks_the_command_before_sending_it(url, tmp_path):
    async with client(url) as nc:
        before = (await nc.jetstream().stream_info("CC_COMMANDS")).state.last_seq
    bad_file = tmp_path / "broken.json"
    bad_file.write_text('{"command_type": "deposit_funds", ')
    cases = [
        (("@" + str(tmp_path / "missing.json"),), f"error: no such file: {tmp_path / 'missing.json'}"),
        ((str(COMMANDS / "deposit_cmd_1.json"),), f"write @{COMMANDS / 'deposit_cmd_1.json'} to send the file"),
        (("@" + str(bad_file),), f"error: {bad_file} is not JSON (Expecting"),
        (("not json",), "error: the command is not JSON"),
        (('{"key": "ABC123", "data": {}}',), "error: not sent: malformed command: command_type: Field required"),
        (('{"command_type": "x", "key": "a.>", "data": {}}',), "key 'a.>' is not allowed"),
    ]
    for args, message in cases:
        done = cli("send", "bankaccount", *args, url=url)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr and done.stderr.count("\n") == 1, (args, done.stderr)
        assert done.stdout == ""
    from_stdin = cli("send", "bankaccount", "-", url=url, stdin=json.dumps(_create("STDIN1")))
    assert from_stdin.returncode == 0 and json.loads(from_stdin.stdout)["status"] == "accepted"
    async with client(url) as nc:
        assert (await nc.jetstream().stream_info("CC_COMMANDS")).state.last_seq == before + 1  # only the good one
        assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.STDIN1"))["balance"] == 100


CLIENT_COMMANDS = [
    ("send", "bankaccount", '{"command_type": "x", "key": "k", "data": {}}'),
    ("status",),
    ("state", "bankaccount", "ABC123"),
    ("events",),
    ("events", "--follow"),
    ("result", "1", "--wait"),
    ("readmodel", "bankaccount_projector"),
    ("readmodel", "bankaccount_projector", "balance.ABC123"),
    ("deadletters", "list"),
    ("deadletters", "show", "1"),
    ("deadletters", "retry", "1"),
    ("deadletters", "purge", "--yes"),
    ("rebuild", str(MANIFEST)),
    ("replay", str(MANIFEST), "bankaccount_projector"),
    ("undeploy", str(MANIFEST)),
]


def _command_id(args: tuple[str, ...]) -> str:
    return " ".join(Path(a).name if "/" in a else "JSON" if a.startswith("{") else a for a in args)


@pytest.mark.parametrize("args", CLIENT_COMMANDS, ids=[_command_id(args) for args in CLIENT_COMMANDS])
def test_every_client_command_fails_at_once_with_one_line_when_nats_refuses(args):
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = cli(*args, "--nats-url", url)
    took = time.monotonic() - started
    assert done.returncode == 2 and took < REFUSED_WITHIN, (took, done.stderr)
    assert done.stderr == (f"error: cannot reach NATS at {url}: connection refused (is `concordance up` running, "
                           f"or is another server meant? --nats-url or NATS_URL)\n")


def test_version():
    for args in (("--version",), ("version",)):
        done = cli(*args)
        assert (done.returncode, done.stdout) == (0, f"{__version__}\n")


def test_help_shows_each_paragraph_whole():
    """Help texts are not broken where the source's lines end: each paragraph of every command's
    docstring appears on one line of its --help, given room."""
    script = (
        "import json\n"
        "from typer.testing import CliRunner\n"
        "from concordance_provider.cli import app\n"
        "out = {}\n"
        "def walk(group, path):\n"
        "    for info in group.registered_commands:\n"
        "        name = path + [info.name or info.callback.__name__.replace('_', '-')]\n"
        "        done = CliRunner().invoke(app, name + ['--help'])\n"
        "        out[' '.join(name)] = [info.callback.__doc__ or '', done.output]\n"
        "    for sub in group.registered_groups:\n"
        "        walk(sub.typer_instance, path + [sub.name])\n"
        "walk(app, [])\n"
        "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TERMINAL_WIDTH": "400", "NO_COLOR": "1"})
    helps = json.loads(done.stdout)
    assert {"send", "up", "state", "events", "result", "readmodel", "deadletters retry"} <= set(helps)
    for command, (doc, output) in helps.items():
        lines = [" ".join(line.strip(" │").split()) for line in output.splitlines()]
        for paragraph in (p for p in doc.split("\n\n") if p.strip()):
            whole = " ".join(paragraph.split())
            assert whole in lines, (command, whole, output)
