"""The aggregate repository: catch-up without double folds, its cache, guarded saves, rebuild."""

from __future__ import annotations

import asyncio
import json

import pytest
from fakes.bank import STREAM, FakeBank, balance
from fakes.engine import NAME, Engine, command

from concordance_provider.engine.memory import InMemoryEventLog, InMemoryStateStore
from concordance_provider.engine.repository import MAX_REBUILD_ATTEMPTS, AggregateRepository, CurrentState
from concordance_provider.naming import aggregate_state_key
from concordance_provider.runtime import ComponentFailed

KEY = aggregate_state_key(NAME, "A")


@pytest.fixture
async def opened() -> Engine:
    """Account A opened with 100 and given 1: two events, state saved after the second."""
    engine = Engine()
    await engine.processor.process(command("open", balance=100))
    await engine.processor.process(command("deposit", amount=1))
    return engine


async def test_state_records_the_last_event_folded_into_it(opened):
    assert await opened.state() == (101, 2)


async def test_catch_up_folds_only_the_events_after_the_stored_state(opened):
    opened.append_directly("A", "funds_deposited", "elsewhere", amount=10)
    opened.append_directly("A", "funds_deposited", "elsewhere", amount=20)
    fresh = opened.twin()

    current = await fresh.repository.current("A")

    assert fresh.bank.folds == 2  # not the two events the stored state already holds
    assert current == CurrentState(json.dumps({"balance": 131}), 4, 2, current.revision)
    assert current.behind


async def test_a_message_that_is_not_an_event_is_not_folded_but_guards_the_next_append(opened):
    opened.log.publish("cc.events.garbage.bank.A", b"not a cloud event")
    fresh = opened.twin()
    current = await fresh.repository.current("A")
    assert fresh.bank.folds == 0 and current.event_seq == 3 and balance(current.value) == 101
    assert (await fresh.processor.process(command("deposit", amount=1))).status == "accepted"
    assert await fresh.state() == (102, 4)


async def test_the_event_consumer_catches_stored_state_up_once(opened):
    seq = opened.append_directly("A", "funds_deposited", "command:500", amount=9)  # then a crash
    fresh = opened.twin()

    await fresh.repository.catch_up("A", seq)
    assert await fresh.state() == (110, seq)
    folds, writes = fresh.bank.folds, opened.states.writes

    await fresh.repository.catch_up("A", seq)  # redelivered: nothing to do
    assert fresh.bank.folds == folds and opened.states.writes == writes


async def test_the_event_consumer_reads_nothing_for_events_its_repository_stored(opened):
    loads, reads = opened.states.loads, opened.log.last_seq_reads
    await opened.repository.catch_up("A", 2)
    await opened.repository.catch_up("A", 1)
    assert (opened.states.loads, opened.log.last_seq_reads) == (loads, reads)


async def test_the_event_consumer_catches_up_past_a_stale_cache(opened):
    seq = opened.append_directly("A", "funds_deposited", "elsewhere", amount=9)  # another daemon, then a crash
    await opened.repository.catch_up("A", seq)
    assert await opened.state() == (110, seq)


@pytest.mark.parametrize("seq", [1, 2])
async def test_the_event_consumer_leaves_state_that_is_as_new_or_newer_after_one_read(opened, seq):
    writes, loads, reads = opened.states.writes, opened.states.loads, opened.log.last_seq_reads
    await opened.twin().repository.catch_up("A", seq)
    assert (opened.states.writes, opened.states.loads, opened.log.last_seq_reads) == (writes, loads + 1, reads)


async def test_the_event_consumer_trusts_a_cached_state_that_the_store_has_not_caught_up_with(opened):
    seq = opened.append_directly("A", "funds_deposited", "elsewhere", amount=9)  # then a crash
    fresh = opened.twin()
    await fresh.processor.process(command("noop"))  # folds the event in, saves nothing
    reads = opened.log.last_seq_reads
    await fresh.repository.catch_up("A", seq)
    assert opened.log.last_seq_reads == reads
    assert await opened.state() == (110, seq)


async def test_the_event_consumer_waits_for_a_command_on_its_key(opened):
    seq = opened.append_directly("A", "funds_deposited", "elsewhere", amount=9)  # then a crash
    fresh = opened.twin()
    release = asyncio.Event()

    async def wait_for_release() -> None:
        fresh.bank.before_decide = None
        await release.wait()

    fresh.bank.before_decide = wait_for_release
    deciding = asyncio.create_task(fresh.processor.process(command("deposit", amount=1)))
    while fresh.bank.before_decide is not None:
        await asyncio.sleep(0)
    catching_up = asyncio.create_task(fresh.repository.catch_up("A", seq))
    rebuilding = asyncio.create_task(fresh.repository.rebuild("A"))
    for _turn in range(20):
        await asyncio.sleep(0)
    assert not catching_up.done() and not rebuilding.done()
    release.set()
    await asyncio.gather(deciding, catching_up, rebuilding)
    assert await opened.state() == (111, seq + 1)


async def test_a_current_cache_skips_the_state_and_last_sequence_reads(opened):
    loads, reads = opened.states.loads, opened.log.last_seq_reads
    await opened.processor.process(command("deposit", amount=1))
    await opened.processor.process(command("withdraw", amount=1))
    assert (opened.states.loads, opened.log.last_seq_reads) == (loads, reads)
    assert await opened.state() == (101, 4)


async def test_a_state_read_from_the_store_is_kept_too(opened):
    fresh = opened.twin()
    assert (await fresh.processor.process(command("withdraw", amount=1000))).status == "rejected"
    loads = opened.states.loads
    await fresh.processor.process(command("deposit", amount=1))
    assert opened.states.loads == loads


async def test_state_as_new_as_the_log_reads_no_events(opened):
    class CountingLog(InMemoryEventLog):
        reads = 0

        def events(self, stream, key, after_seq=0):  # type: ignore[no-untyped-def]
            self.reads += 1
            return super().events(stream, key, after_seq)

    log = CountingLog()
    engine = Engine(log=log, cache_size=0)
    await engine.processor.process(command("open", balance=1))
    await engine.processor.process(command("deposit", amount=1))
    assert log.reads == 0
    log.publish("cc.events.junk.bank.A", b"not an event")
    await engine.processor.process(command("deposit", amount=1))
    assert log.reads == 1


async def test_without_a_cache_every_command_reads_state_and_log():
    engine = Engine(cache_size=0)
    await engine.processor.process(command("open", balance=1))
    loads, reads = engine.states.loads, engine.log.last_seq_reads
    await engine.processor.process(command("deposit", amount=1))
    assert (engine.states.loads, engine.log.last_seq_reads) == (loads + 1, reads + 1)


async def test_the_cache_keeps_the_most_recently_used_instances():
    engine = Engine(cache_size=2)
    for key in ("A", "B", "C"):
        await engine.processor.process(command("open", key))
    assert [engine.repository.cached(k) is not None for k in ("A", "B", "C")] == [False, True, True]
    await engine.repository.current("B")  # used: C is now the oldest
    await engine.processor.process(command("deposit", "A", amount=1))
    assert [engine.repository.cached(k) is not None for k in ("A", "B", "C")] == [True, True, False]


async def test_a_save_that_finds_an_older_state_written_meanwhile_writes_again(opened):
    async def another_daemon_catches_up_to_an_older_event() -> None:
        opened.bank.before_decide = None
        stored = await opened.states.load(KEY)
        await opened.states.save(KEY, json.dumps({"balance": 101}), 2, stored.revision)

    opened.bank.before_decide = another_daemon_catches_up_to_an_older_event
    await opened.processor.process(command("deposit", amount=4))
    assert await opened.state() == (105, 3)  # a client reading state after the outcome sees the deposit
    assert opened.repository.cached("A") is not None


async def test_a_save_that_finds_the_same_state_written_meanwhile_leaves_it(opened):
    class CaughtUpFirst(InMemoryStateStore):
        async def save(self, key: str, value: str | None, event_seq: int, revision: int) -> int:
            if event_seq == 3 and (await self.load(key)).event_seq < 3:  # another daemon's event consumer
                await super().save(key, value, event_seq, (await self.load(key)).revision)
            return await super().save(key, value, event_seq, revision)

    engine = Engine(states=CaughtUpFirst())
    await engine.processor.process(command("open", balance=1))
    await engine.processor.process(command("deposit", amount=1))
    writes = engine.states.writes
    await engine.processor.process(command("deposit", amount=1))
    assert engine.states.writes == writes + 1  # the other daemon's write, not ours again
    assert await engine.state() == (3, 3)


async def test_a_save_that_finds_a_newer_state_leaves_it(opened):
    async def another_writer_stores_a_later_state() -> None:
        opened.bank.before_decide = None
        stored = await opened.states.load(KEY)
        await opened.states.save(KEY, json.dumps({"balance": 7}), 99, stored.revision)

    opened.bank.before_decide = another_writer_stores_a_later_state
    await opened.processor.process(command("deposit", amount=4))
    assert await opened.state() == (7, 99)
    assert opened.repository.cached("A") is None  # the store knows more than the cache


async def test_a_save_that_keeps_conflicting_gives_up_and_forgets_the_cached_state(opened):
    class AlwaysOlder(InMemoryStateStore):
        async def save(self, key: str, value: str | None, event_seq: int, revision: int) -> int:
            await super().save(key, value, 0, (await self.load(key)).revision)  # someone writes an old state
            return await super().save(key, value, event_seq, revision)

    engine = Engine(states=AlwaysOlder())
    await engine.processor.process(command("open", balance=1))
    assert engine.repository.cached("A") is None
    assert (await engine.states.load(aggregate_state_key(NAME, "A"))).event_seq == 0


# -- rebuild -----------------------------------------------------------------------------------------

async def test_rebuild_folds_the_whole_log_and_stores_the_same_state(opened):
    before = await opened.states.load(KEY)
    opened.log.publish("cc.events.garbage.bank.A", b"not a cloud event")
    rebuilder = opened.twin()

    value = await rebuilder.repository.rebuild("A")

    after = await opened.states.load(KEY)
    assert value == before.value == after.value
    assert after.event_seq == 3  # the last message, the next append's guard
    assert rebuilder.bank.folds == 2


async def test_rebuild_of_lost_state_and_of_an_instance_without_events():
    engine = Engine()
    await engine.processor.process(command("open", balance=5))
    engine.states._entries.clear()
    assert balance(await engine.twin().repository.rebuild("A")) == 5
    assert await engine.twin().repository.rebuild("nobody") is None
    nobody = await engine.states.load(aggregate_state_key(NAME, "nobody"))
    assert nobody.revision > 0 and nobody.event_seq == 0


async def test_rebuild_folds_again_when_a_command_lands_meanwhile(opened):
    rebuilder = opened.twin()
    folds_before_landing = []

    async def a_command_lands(event, state):  # type: ignore[no-untyped-def]
        if not folds_before_landing:
            folds_before_landing.append(1)
            await opened.processor.process(command("deposit", amount=50))
        return await FakeBank.apply_event(rebuilder.bank, event, state)

    rebuilder.bank.apply_event = a_command_lands  # type: ignore[method-assign]
    assert balance(await rebuilder.repository.rebuild("A")) == 151
    assert await opened.state() == (151, 3)


async def test_rebuild_gives_up_when_state_keeps_changing(opened):
    class Busy(InMemoryStateStore):
        async def load(self, key):  # type: ignore[no-untyped-def]
            stored = await super().load(key)
            await super().save(key, stored.value, stored.event_seq, stored.revision)  # a writer, every time
            return stored

    busy = Busy()
    repository = AggregateRepository(NAME, STREAM, FakeBank(), opened.log, busy)
    with pytest.raises(ComponentFailed, match="kept changing during the rebuild"):
        await repository.rebuild("A")
    assert busy.loads == MAX_REBUILD_ATTEMPTS


async def test_rebuild_forgets_the_cached_state(opened):
    assert opened.repository.cached("A") is not None
    await opened.repository.rebuild("A")
    assert opened.repository.cached("A") is None


async def test_keys_are_the_instances_with_events():
    engine = Engine(log=InMemoryEventLog())
    for key in ("B", "A"):
        await engine.processor.process(command("open", key))
    engine.log.publish("cc.events.account_opened.otherbank.C", b"{}")
    assert await engine.repository.keys() == ["A", "B"]
