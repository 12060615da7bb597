"""Components that loop, trap or hog memory fail their own message, never the daemon."""

from __future__ import annotations

import asyncio

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import structlog.testing

from concordance_provider.links import Role
from concordance_provider.runtime import ComponentFailed, RejectedByComponent
from concordance_provider.runtime.wasmtime_host import (
    ComponentLoadError,
    Grants,
    WasmtimeComponent,
)

from .harness import client, daemon, events_of_stream, kv_json, nats_server, result, send

pytestmark = pytest.mark.integration


def _looper(path: Path, timeout_ms: int = 300) -> WasmtimeComponent:
    return WasmtimeComponent("looper", path, Role.AGGREGATE, call_timeout_ms=timeout_ms, max_memory_mb=64)


async def _count(component: WasmtimeComponent) -> int:
    events = await component.handle_command("looper", "count", "k", None, "{}")
    return len(events)


async def test_infinite_loop_is_interrupted_at_its_deadline_and_the_next_call_works(looper_component):
    component = _looper(looper_component)
    await component.start()
    try:
        started = time.monotonic()
        with pytest.raises(ComponentFailed, match="deadline"):
            await component.handle_command("looper", "spin", "k", None, "{}")
        assert time.monotonic() - started < 5
        assert await _count(component) == 1
    finally:
        await component.close()


async def test_a_looping_aggregate_holds_the_event_loop_for_tens_of_milliseconds_at_most(looper_component):
    """Short calls are made on the event loop; one running long is stopped there and made again on the
    component's thread, so the daemon's other work goes on meanwhile."""
    component = _looper(looper_component, timeout_ms=1000)
    await component.start()
    gaps: list[float] = []

    async def ticking() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    try:
        assert await _count(component) == 1
        ticker = asyncio.create_task(ticking())
        await asyncio.sleep(0.05)  # ticking before the call starts
        started = time.monotonic()
        with pytest.raises(ComponentFailed, match="deadline of 1.00s"):
            await component.handle_command("looper", "spin", "k", None, "{}")
        assert time.monotonic() - started >= 0.9  # the whole deadline, on the component's thread
        ticker.cancel()
        assert max(gaps) < 0.2, f"the event loop stood still for {max(gaps) * 1000:.0f} ms"
        assert await _count(component) == 1
    finally:
        await component.close()


async def test_a_call_that_waited_for_a_cpu_is_made_again_and_later_calls_stay_on_the_event_loop(looper_component):
    """On a busy machine the process may wait for a core mid-call, past the event loop's share of
    time though it used little CPU: that call is made again on the component's thread, and only a
    call that used the CPU for that long moves the component's calls there for good."""
    with structlog.testing.capture_logs() as logs:
        component = _looper(looper_component, timeout_ms=1000)
        await component.start()
        try:
            assert await _count(component) == 1
            assert len(await component.handle_command("looper", "nap", "k", None, '{"seconds": 0.06}')) == 1
            assert await _count(component) == 1
            assert not [e for e in logs if "took over" in e["event"]], logs
            assert [e for e in logs if "waiting for a CPU" in e["event"] and e["cpu_ms"] < 10], logs

            assert len(await component.handle_command("looper", "busy", "k", None, '{"seconds": 0.06}')) == 1
            assert [e for e in logs if "took over" in e["event"] and e["cpu_ms"] >= 10], logs
        finally:
            await component.close()


async def test_no_call_is_made_on_the_event_loop_while_one_runs_on_the_thread(looper_component):
    """One instance, one call at a time: while a call made again on the component's thread runs,
    the calls that come meanwhile wait for it instead of running on the event loop beside it."""
    component = _looper(looper_component, timeout_ms=1000)
    await component.start()
    lock, running, most = threading.Lock(), [0], [0]
    call = component._call

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return call(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    async def count_after(seconds: float) -> int:
        await asyncio.sleep(seconds)
        return await _count(component)

    component._call = counted
    try:
        assert await _count(component) == 1
        # the nap outlasts the event loop's share and is made again on the thread; counts come meanwhile
        napped, *counted_ = await asyncio.gather(
            component.handle_command("looper", "nap", "k", None, '{"seconds": 0.08}'),
            *(count_after(0.02 * i) for i in range(1, 7)))
        assert len(napped) == 1 and counted_ == [1] * 6
        assert most[0] == 1, f"{most[0]} calls of one component ran at once"
    finally:
        await component.close()


@pytest.mark.parametrize("command", ["crash", "hog"])
async def test_trap_and_runaway_memory_fail_one_call(looper_component, command):
    component = _looper(looper_component, timeout_ms=5000)
    await component.start()
    try:
        with pytest.raises(ComponentFailed):
            await component.handle_command("looper", command, "k", None, "{}")
        assert await _count(component) == 1
    finally:
        await component.close()


async def test_error_result_is_a_rejection_not_a_fault(looper_component):
    component = _looper(looper_component)
    await component.start()
    try:
        with pytest.raises(RejectedByComponent, match="unknown command nope"):
            await component.handle_command("looper", "nope", "k", None, "{}")
    finally:
        await component.close()


async def test_wrong_world_is_refused_naming_what_is_missing(looper_component):
    component = WasmtimeComponent("looper", looper_component, Role.PROJECTOR, call_timeout_ms=100, max_memory_mb=64)
    with pytest.raises(ComponentLoadError, match="does not export apply-stateless-event"):
        await component.start()
    await component.close()


async def test_not_a_component_is_refused(tmp_path):
    bogus = tmp_path / "bogus.wasm"
    bogus.write_bytes(b"\0asm not really")
    component = WasmtimeComponent("bogus", bogus, Role.AGGREGATE, call_timeout_ms=100, max_memory_mb=64)
    with pytest.raises(ComponentLoadError, match="not a WebAssembly component"):
        await component.start()
    await component.close()


MANIFEST = """\
apiVersion: core.oam.dev/v1beta1
kind: Application
metadata: {name: looper}
spec:
  components:
    - name: looper
      type: component
      properties: {image: "file://%s"}
      traits:
        - type: link
          properties:
            target: concordance
            values: {ROLE: aggregate, NAME: looper, INTEREST: looper, CALL_TIMEOUT_MS: "300", MAX_DELIVERIES: "3"}
"""


async def test_daemon_keeps_serving_while_a_component_loops_forever(looper_component, tmp_path):
    manifest = tmp_path / "app.yaml"
    manifest.write_text(MANIFEST % looper_component)
    with nats_server(tmp_path) as server, daemon(manifest, tmp_path / "d.log", "--nats-url", server.url) as process:
        async with client(server.url) as nc:
            spin = await send(nc, "looper", {"command_type": "spin", "key": "L1", "data": {}})
            counted = [await send(nc, "looper", {"command_type": "count", "key": "L2", "data": {}}) for _ in range(3)]
            assert [(await result(nc, s))["status"] for s in counted] == ["accepted"] * 3
            outcome = await result(nc, spin, timeout=60)
            assert outcome["status"] == "rejected" and "deadline" in outcome["error"]
            assert "after 3 attempts" in outcome["error"]
            assert (await kv_json(nc, "CC_STATE", "agg.looper.L2")) == {"count": 3}
        assert process.process.poll() is None

        listed = _cli("deadletters", "list", "--nats-url", server.url)
        (line,) = listed.splitlines()
        dead_seq, consumer, subject, deliveries, reason = line.split("\t")
        assert (consumer, subject, deliveries) == ("AGG_CMD_looper", "cc.commands.looper", "3")
        assert "deadline" in reason
        shown = json.loads(_cli("deadletters", "show", dead_seq, "--nats-url", server.url))
        assert json.loads(shown["body"]) == {"command_type": "spin", "key": "L1", "data": {}}
        assert shown["stream_seq"] == spin

        retried = _cli("deadletters", "retry", dead_seq, "--nats-url", server.url)
        new_seq = int(retried.rsplit(" ", 1)[1])
        async with client(server.url) as nc:  # it spins again: a second dead letter, for the new command
            assert "deadline" in (await result(nc, new_seq, timeout=60))["error"]
        again = _cli("deadletters", "list", "--nats-url", server.url).splitlines()
        assert [row.split("\t")[1:3] for row in again] == [["AGG_CMD_looper", "cc.commands.looper"]]
        assert again[0].split("\t")[0] != dead_seq
        refused = _cli("deadletters", "retry", dead_seq, "--nats-url", server.url, ok=False)
        assert f"no dead letter {dead_seq}" in refused

        _cli("deadletters", "purge", "--yes", "--nats-url", server.url)
        assert _cli("deadletters", "list", "--nats-url", server.url) == ""


MALFORMED = [
    ("bad_type", "malformed event"),
    ("bad_payload", "payload is not JSON"),
    ("wrong_stream", "may only append to its stream 'looper'"),
    ("huge", "over the NATS maximum payload"),
    ("unfoldable", "refused to apply unfoldable: this event cannot be folded (after 3 attempts)"),
]


@pytest.fixture(scope="module")
async def malformed(looper_component, tmp_path_factory):
    """One daemon for the malformed-event cases. Each case's command, on a key of its own, is sent
    at once, so that their retries run side by side; each case then reads its own outcome."""
    tmp = tmp_path_factory.mktemp("malformed")
    manifest = tmp / "app.yaml"
    manifest.write_text(MANIFEST % looper_component)
    with nats_server(tmp) as server, daemon(manifest, tmp / "d.log", "--nats-url", server.url):
        async with client(server.url) as nc:
            sent = {command: await send(nc, "looper", {"command_type": command, "key": f"M-{command}", "data": {}})
                    for command, _ in MALFORMED}
        yield server.url, sent


@pytest.mark.parametrize("command, error", MALFORMED)
async def test_malformed_events_from_a_component_append_nothing(malformed, command, error):
    url, sent = malformed
    seq = sent[command]
    async with client(url) as nc:
        outcome = await result(nc, seq, timeout=60)
        assert outcome["status"] == "rejected" and error in outcome["error"]
        assert outcome["error"].endswith("(after 3 attempts)")  # retried, then rejected
        letters = await events_of_stream(nc, "CC_DEADLETTER", "cc.deadletter.AGG_CMD_looper")
        assert {letter["stream_seq"] for letter in letters} <= set(sent.values()), letters  # only those sent
        (letter,) = [letter for letter in letters if letter["stream_seq"] == seq]
        assert (letter["stream_seq"], letter["deliveries"], letter["reason"]) == (seq, 3, outcome["error"])
        assert await kv_json(nc, "CC_STATE", f"agg.looper.M-{command}") is None
        assert (await nc.jetstream().stream_info("CC_EVENTS")).state.messages == 0


@pytest.mark.parametrize("command, timeout_ms, error", [
    ("spin", 300, "call exceeded its deadline of 0.30s"),
    ("crash", 5000, "wasm trap"),
    ("hog", 5000, "wasm trap"),  # MemoryError at the 64 MB limit aborts the guest
])
async def test_a_call_that_traps_or_runs_away_is_retried_then_dead_lettered(looper_component, tmp_path, command,
                                                                            timeout_ms, error):
    manifest = tmp_path / "app.yaml"
    manifest.write_text((MANIFEST % looper_component).replace(
        'CALL_TIMEOUT_MS: "300"', f'CALL_TIMEOUT_MS: "{timeout_ms}", MAX_MEMORY_MB: "64"'))
    with nats_server(tmp_path) as server, daemon(manifest, tmp_path / "d.log", "--nats-url", server.url) as process:
        async with client(server.url) as nc:
            seq = await send(nc, "looper", {"command_type": command, "key": "F1", "data": {}})
            outcome = await result(nc, seq, timeout=60)
            assert outcome["status"] == "rejected" and error in outcome["error"], outcome
            assert outcome["error"].endswith("(after 3 attempts)")
            (letter,) = await events_of_stream(nc, "CC_DEADLETTER", "cc.deadletter.AGG_CMD_looper")
            assert (letter["stream_seq"], letter["deliveries"], letter["reason"]) == (seq, 3, outcome["error"])
            # the instance was replaced: the next command on the same key works
            assert (await result(nc, await send(nc, "looper", {"command_type": "count", "key": "F1", "data": {}})))[
                "status"] == "accepted"
            assert await kv_json(nc, "CC_STATE", "agg.looper.F1") == {"count": 1}
        assert process.process.poll() is None


async def test_a_long_call_is_not_redelivered_while_it_runs(looper_component, tmp_path):
    manifest = tmp_path / "app.yaml"
    manifest.write_text((MANIFEST % looper_component).replace('CALL_TIMEOUT_MS: "300"', 'CALL_TIMEOUT_MS: "20000", ACK_WAIT_MS: "1000"'))
    with nats_server(tmp_path) as server, daemon(manifest, tmp_path / "d.log", "--nats-url", server.url):
        async with client(server.url) as nc:
            seq = await send(nc, "looper", {"command_type": "busy", "key": "B1", "data": {"seconds": 4}})
            assert (await result(nc, seq, timeout=60))["status"] == "accepted"
            info = await nc.jetstream().consumer_info("CC_COMMANDS", "AGG_CMD_looper")
            assert info.config.ack_wait == 1.0 and info.num_redelivered == 0
            assert (await kv_json(nc, "CC_STATE", "agg.looper.B1")) == {"count": 1}


def _cli(*args: str, ok: bool = True) -> str:
    done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", *args],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode == 0) == ok, done.stderr
    return done.stdout.strip() if ok else done.stderr


async def _probe(component: WasmtimeComponent, target: dict) -> dict:
    (event,) = await component.handle_command("looper", "probe", "k", None, json.dumps(target))
    return json.loads(event.payload)


def _refusal(attempt: dict) -> dict:
    """One probe's outcome without the errno number, which is WASI's own (errno_name is portable)."""
    return {name: value for name, value in attempt.items() if name != "errno"}


def _network_refused(attempt: dict) -> None:
    """A raw TCP socket for a numeric address: without the network, WASI refuses to create the
    socket at all. A probe that connected reports ``allowed`` and fails this."""
    assert _refusal(attempt) == {
        "outcome": "refused", "at": "socket", "type": "PermissionError", "errno_name": "EACCES",
        "message": f"[Errno {attempt.get('errno')}] Permission denied"}


async def test_sandbox_refuses_files_sockets_and_environment(looper_component, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    assert secret.read_text() == "do not read"  # the host can read it; the guest must not
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host, port = listener.getsockname()
        component = _looper(looper_component, timeout_ms=5000)
        await component.start()
        try:
            report = await _probe(component, {"file": str(secret), "host": host, "port": port})
        finally:
            await component.close()
        # had a connection gone through, the listener would hold it now
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    # no directory is granted: the file exists on the host, the guest cannot even see it
    assert _refusal(report["file"]) == {
        "outcome": "refused", "at": "open", "type": "FileNotFoundError", "errno_name": "ENOENT",
        "message": f"[Errno {report['file'].get('errno')}] No such file or directory: '{secret}'"}
    _network_refused(report["socket"])  # to the loopback address where the listener waits
    assert report["env"] == {}


async def test_granted_environment_and_directory_are_visible(looper_component, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "note.txt").write_text("granted")
    (tmp_path / "secret.txt").write_text("above the granted directory")
    component = WasmtimeComponent("looper", looper_component, Role.AGGREGATE, call_timeout_ms=5000,
                                  max_memory_mb=64, grants=Grants(env={"GREETING": "hi"}, dirs={"/data": str(shared)}))
    await component.start()
    try:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            host, port = listener.getsockname()
            report = await _probe(component, {"file": "/data/note.txt", "host": host, "port": port})
            above = await _probe(component, {"file": "/data/../secret.txt", "host": host, "port": port})
    finally:
        await component.close()
    assert report["env"] == {"GREETING": "hi"}
    assert report["file"] == {"outcome": "allowed", "result": "granted"}
    # a granted directory grants nothing above it, and never the network
    assert _refusal(above["file"]) == {
        "outcome": "refused", "at": "open", "type": "PermissionError", "errno_name": "EPERM",
        "message": f"[Errno {above['file'].get('errno')}] Operation not permitted: '/data/../secret.txt'"}
    _network_refused(report["socket"])
