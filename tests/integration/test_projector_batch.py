"""The bank projector applies batches of events in log order, with one daemon or several sharing it.

Deposits over many accounts are the load. Afterwards each account's read model must be exactly the
fold of its events: the balance the aggregate holds, and one ledger entry per event, in log order
(every deposit carries its own note, so an entry applied twice or out of order shows).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from concordance_provider.failpoints import CRASH_EXIT_CODE, ENV
from concordance_provider.store.jetstream import direct_get, read_all

from .harness import DaemonProcess, client, example_manifest, kv_json, nats_server, quiescent, result, send

pytestmark = pytest.mark.integration

BUCKET = "CC_RM_bankaccount_projector"
CHECKPOINT = "_cc.checkpoint.PROJ_bankaccount_projector"
OPENING = 1000


def accounts(tag: str, count: int = 50) -> list[str]:
    return [f"{tag}{i:02d}" for i in range(count)]


async def open_accounts(nc: NATS, keys: list[str]) -> None:
    seqs = [await send(nc, "bankaccount", {"command_type": "create_account", "key": key, "data": {
        "accountNumber": key, "initialBalance": OPENING, "minBalance": 0, "customerId": "C"}}) for key in keys]
    outcomes = [await result(nc, seq, timeout=60) for seq in seqs]
    assert all(o["status"] == "accepted" for o in outcomes), outcomes


async def deposit(nc: NATS, keys: list[str], count: int, in_flight: int = 32, tag: str = "d") -> list[int]:
    """``count`` deposits round-robin over ``keys``, each with its own note; their sequences."""
    js = nc.jetstream()
    seqs = [0] * count
    todo = iter(range(count))

    async def sender() -> None:
        for i in todo:  # a shared iterator: each deposit is sent by one sender
            key = keys[i % len(keys)]
            body = {"command_type": "deposit_funds", "key": key,
                    "data": {"accountNumber": key, "amount": 1 + i % 97, "customerId": "C", "note": f"{tag}{i}"}}
            ack = await js.publish("cc.commands.bankaccount", json.dumps(body).encode(), timeout=10,
                                   headers={"Nats-Msg-Id": f"{tag}{i}"})
            seqs[i] = ack.seq

    await asyncio.gather(*(sender() for _ in range(in_flight)))
    return seqs


async def assert_read_model_exact(nc: NATS, keys: list[str]) -> None:
    """Each account's balance equals the aggregate's, and its ledger is its events, once each, in order."""
    events: dict[str, list[dict]] = defaultdict(list)
    for stored in await read_all(nc, "CC_EVENTS", "cc.events.*.bankaccount.*"):
        events[stored.subject.split(".")[-1]].append(json.loads(stored.data))
    entries: dict[str, dict[str, dict]] = defaultdict(dict)
    for stored in await read_all(nc, f"KV_{BUCKET}", f"$KV.{BUCKET}.ledger.>"):
        _, _, _, account, number = stored.subject.split(".")
        entries[account][number] = json.loads(stored.data)
    for key in keys:
        expected, balance = [], 0
        for event in events[key]:
            amount = event["data"].get("amount", event["data"].get("initialBalance"))
            balance += amount
            expected.append({"event": event["type"], "amount": amount, "note": event["data"].get("note", ""),
                             "balance": balance})
        ledger = [entries[key][n] for n in sorted(entries[key])]
        assert ledger == expected, f"ledger of {key}"
        assert sorted(entries[key]) == [f"{n:06d}" for n in range(1, len(expected) + 1)]
        state = await kv_json(nc, "CC_STATE", f"agg.bankaccount.{key}")
        projected = await kv_json(nc, BUCKET, f"balance.{key}")
        assert projected["balance"] == state["balance"] == balance, key
        assert projected["entries"] == len(expected), key


async def commands_decided(nc: NATS, timeout: float) -> None:
    """Until the aggregate has decided every command sent (its consumer holds none)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await nc.jetstream().consumer_info("CC_COMMANDS", "AGG_CMD_bankaccount")
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"commands still undecided after {timeout}s")


@dataclass
class Lag:
    """The projector's checkpoint against the last event of CC_EVENTS, sampled every 0.1 s."""

    nc: NATS
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (time, last event, checkpoint)

    async def sample(self) -> tuple[float, int, int]:
        last = (await self.nc.jetstream().stream_info("CC_EVENTS")).state.last_seq
        found = await direct_get(self.nc, f"KV_{BUCKET}", last_by_subj=f"$KV.{BUCKET}.{CHECKPOINT}")
        return time.perf_counter(), last, int(found.data) if found else 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.samples.append(await self.sample())
            except Exception:  # noqa: BLE001 - a slow answer under load: the next sample will do
                pass
            await asyncio.sleep(0.1)

    def most_behind(self) -> int:
        return max((last - applied for _, last, applied in self.samples), default=0)


async def test_two_daemons_sharing_the_projector_apply_every_event_once_in_order(example_components, tmp_path):
    manifest = example_manifest(tmp_path, {})
    keys = accounts("TWO")
    with nats_server(tmp_path) as server:
        first = DaemonProcess(manifest, tmp_path / "a.log", "--nats-url", server.url, "--log-level", "debug")
        second = DaemonProcess(manifest, tmp_path / "b.log", "--nats-url", server.url, "--log-level", "debug")
        try:
            first.wait_ready()
            second.wait_ready()
            async with client(server.url) as nc:
                await open_accounts(nc, keys)
                await deposit(nc, keys, 1500)
                await quiescent(nc, timeout=180)
                await assert_read_model_exact(nc, keys)
            for process in (first, second):  # both took part
                assert any(e.get("event") == "events applied" and e.get("handler") == "bankaccount_projector"
                           for e in process.logs()), process.log_path
        finally:
            assert second.stop() == 0
            assert first.stop() == 0


async def test_a_daemon_killed_holding_a_batch_leaves_the_read_model_exact(example_components, tmp_path):
    manifest = example_manifest(tmp_path, {})
    keys = accounts("KIL")
    with nats_server(tmp_path) as server:
        survivor = DaemonProcess(manifest, tmp_path / "survivor.log", "--nats-url", server.url)
        doomed = None
        try:
            survivor.wait_ready()
            async with client(server.url) as nc:
                await open_accounts(nc, keys)
                # it crashes before its third commit of projector writes, as after kill -9, under load
                doomed = DaemonProcess(manifest, tmp_path / "doomed.log", "--nats-url", server.url,
                                       env={ENV: "read_model.before_commit=crash@3"})
                doomed.wait_ready()
                sending = asyncio.create_task(deposit(nc, keys, 1200))
                deadline = time.monotonic() + 120
                while doomed.process.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert doomed.process.returncode == CRASH_EXIT_CODE, "the failpoint never fired"
                await sending
                await quiescent(nc, timeout=180)  # the dead daemon's events come back after the ack wait
                await assert_read_model_exact(nc, keys)
        finally:
            if doomed is not None:
                doomed.stop()
            assert survivor.stop() == 0


async def test_the_projector_keeps_up_with_the_load(example_components, tmp_path):
    manifest = example_manifest(tmp_path, {})
    keys = accounts("LAG")
    with nats_server(tmp_path) as server:
        process = DaemonProcess(manifest, tmp_path / "d.log", "--nats-url", server.url)
        try:
            process.wait_ready()
            async with client(server.url) as nc:
                await open_accounts(nc, keys)
                lag, stop = Lag(nc), asyncio.Event()
                sampler = asyncio.create_task(lag.run(stop))
                started = time.perf_counter()
                await deposit(nc, keys, 2000)
                await commands_decided(nc, timeout=120)
                last_outcome = time.perf_counter()
                rate = 2000 / (last_outcome - started)
                target = (await lag.sample())[1]
                current_after = None
                while time.perf_counter() - last_outcome < 60:
                    _, _, applied = await lag.sample()
                    if applied >= target:
                        current_after = time.perf_counter() - last_outcome
                        break
                    await asyncio.sleep(0.02)
                stop.set()
                await sampler
                behind = lag.most_behind()
                print(f"\nprojector: {rate:.0f} events/s; at most {behind} events behind "
                      f"({behind / rate:.2f} s of traffic); current {current_after} s after the last outcome")
                assert current_after is not None and current_after < 30
                await quiescent(nc, timeout=120)
                await assert_read_model_exact(nc, keys)
        finally:
            assert process.stop() == 0
