"""The rules every ``EventLog`` and ``StateStore`` keeps, as test cases each implementation subclasses.

A subclass provides the ``backend`` fixture: the log and store under test, the log's maximum message
size, and a way to publish a message without any guard (as anyone may on ``cc.events.>``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Protocol

import pytest
from fakes.bank import STREAM, balance
from fakes.engine import NAME, Engine, command

from concordance_provider import failpoints
from concordance_provider.engine.mapper import EventMessage, LoggedEvent, signed, to_cloud_event, to_message
from concordance_provider.engine.persistence import (
    AlreadyAppended,
    AppendConflict,
    EventLog,
    EventTooLarge,
    StateConflict,
    StateStore,
    StoredState,
)
from concordance_provider.failpoints import FailpointError
from concordance_provider.naming import aggregate_state_key
from concordance_provider.runtime import Event
from concordance_provider.signing import SIGNATURE, Position, Signer

_ids = itertools.count(1)


class Backend(Protocol):
    log: EventLog
    states: StateStore
    max_payload: int

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int: ...

    def signed(self, signer: Signer) -> "Backend":
        """The same stores, signing with ``signer`` what they write and checking what they read."""
        ...

    async def write_state(self, key: str, value: str, event_seq: int, headers: dict[str, str]) -> int:
        """Write a state record without a guard, as anyone may write to the bucket; its revision."""
        ...


def message(stream: str, key: str, event_type: str = "thing_happened", *, causation: str = "test",
            size: int = 0, message_id: str | None = None) -> EventMessage:
    cloud = to_cloud_event(Event(event_type, stream, json.dumps({"pad": "x" * size})), stream, key)
    return to_message(cloud, key, causation, message_id or f"m{uuid.uuid4().hex}")


async def read(log: EventLog, stream: str, key: str, after_seq: int = 0) -> list[LoggedEvent]:
    return [event async for event in log.events(stream, key, after_seq)]


class EventLogContract:
    @pytest.fixture
    def backend(self) -> Backend:
        raise NotImplementedError

    @pytest.fixture
    def stream(self) -> str:
        return f"s{next(_ids)}x{uuid.uuid4().hex[:8]}"  # every test its own aggregate stream

    async def test_a_new_instance_has_no_messages(self, backend, stream):
        assert await backend.log.last_seq(stream, "K") == 0
        assert await read(backend.log, stream, "K") == []
        assert await backend.log.keys(stream) == []

    async def test_an_append_expecting_the_instances_last_sequence_is_stored(self, backend, stream):
        [first] = await backend.log.append(stream, "K", [message(stream, "K")], expected_last_seq=0)
        assert await backend.log.last_seq(stream, "K") == first
        [second] = await backend.log.append(stream, "K", [message(stream, "K")], expected_last_seq=first)
        assert second > first
        assert [e.seq for e in await read(backend.log, stream, "K")] == [first, second]

    async def test_several_events_get_consecutive_sequences_in_order(self, backend, stream):
        sent = [message(stream, "K", f"step_{i}") for i in range(3)]
        seqs = await backend.log.append(stream, "K", sent, expected_last_seq=0)
        assert seqs == list(range(seqs[0], seqs[0] + 3))
        assert [e.event_type for e in await read(backend.log, stream, "K")] == ["step_0", "step_1", "step_2"]

    @pytest.mark.parametrize("count", [1, 3])
    @pytest.mark.parametrize("wrong", [-1, +1, +5])
    async def test_a_wrong_expected_sequence_is_refused_and_nothing_is_stored(self, backend, stream, count, wrong):
        [last] = await backend.log.append(stream, "K", [message(stream, "K")], expected_last_seq=0)
        with pytest.raises(AppendConflict):
            await backend.log.append(stream, "K", [message(stream, "K") for _ in range(count)],
                                     expected_last_seq=last + wrong)
        assert await backend.log.last_seq(stream, "K") == last
        assert len(await read(backend.log, stream, "K")) == 1

    async def test_the_first_append_expects_zero(self, backend, stream):
        with pytest.raises(AppendConflict):
            await backend.log.append(stream, "K", [message(stream, "K")], expected_last_seq=1)
        assert await backend.log.last_seq(stream, "K") == 0

    @pytest.mark.parametrize("large", [0, 1])
    async def test_an_append_with_an_event_too_large_stores_nothing(self, backend, stream, large):
        sent = [message(stream, "K"), message(stream, "K")]
        sent[large] = message(stream, "K", size=backend.max_payload)
        with pytest.raises(EventTooLarge):
            await backend.log.append(stream, "K", sent, expected_last_seq=0)
        assert await backend.log.last_seq(stream, "K") == 0
        assert await read(backend.log, stream, "K") == []

    @pytest.mark.parametrize("count", [1, 2])
    async def test_a_message_id_already_stored_makes_the_append_a_duplicate(self, backend, stream, count):
        first = [message(stream, "K", message_id=f"{stream}:{i}") for i in range(count)]
        seqs = await backend.log.append(stream, "K", first, expected_last_seq=0)
        again = [message(stream, "K", message_id=f"{stream}:{i}") for i in range(count)]
        with pytest.raises(AlreadyAppended):
            await backend.log.append(stream, "K", again, expected_last_seq=seqs[-1])
        assert await backend.log.last_seq(stream, "K") == seqs[-1]

    async def test_read_after_a_sequence_returns_the_later_events_in_order(self, backend, stream):
        seqs = []
        for i in range(4):
            seqs += await backend.log.append(stream, "K", [message(stream, "K", f"e{i}")],
                                             expected_last_seq=seqs[-1] if seqs else 0)
        later = await read(backend.log, stream, "K", after_seq=seqs[1])
        assert [(e.seq, e.event_type) for e in later] == [(seqs[2], "e2"), (seqs[3], "e3")]
        assert await read(backend.log, stream, "K", after_seq=seqs[3]) == []

    async def test_reads_go_on_past_a_page(self, backend, stream):
        last = 0
        for _batch in range(3):
            last = (await backend.log.append(stream, "K", [message(stream, "K") for _ in range(200)],
                                             expected_last_seq=last))[-1]
        events = await read(backend.log, stream, "K")
        assert len(events) == 600 and [e.seq for e in events] == sorted(e.seq for e in events)
        assert len(await read(backend.log, stream, "K", after_seq=events[299].seq)) == 300

    async def test_instances_are_guarded_and_read_separately(self, backend, stream):
        other_stream = f"{stream}o"
        a = await backend.log.append(stream, "A", [message(stream, "A")], expected_last_seq=0)
        b = await backend.log.append(stream, "B", [message(stream, "B")], expected_last_seq=0)
        c = await backend.log.append(other_stream, "A", [message(other_stream, "A")], expected_last_seq=0)
        assert [await backend.log.last_seq(s, k) for s, k in ((stream, "A"), (stream, "B"), (other_stream, "A"))] \
            == [a[0], b[0], c[0]]
        assert [e.seq for e in await read(backend.log, stream, "A")] == a
        assert await backend.log.keys(stream) == ["A", "B"]

    async def test_a_message_that_is_not_an_event_guards_appends_but_is_left_out_of_reads(self, backend, stream):
        [event] = await backend.log.append(stream, "K", [message(stream, "K")], expected_last_seq=0)
        garbage = await backend.publish(f"cc.events.junk.{stream}.K", b"not a cloud event")
        assert await backend.log.last_seq(stream, "K") == garbage
        assert [e.seq for e in await read(backend.log, stream, "K")] == [event]
        with pytest.raises(AppendConflict):
            await backend.log.append(stream, "K", [message(stream, "K")], expected_last_seq=event)
        await backend.log.append(stream, "K", [message(stream, "K")], expected_last_seq=garbage)

    async def test_a_retried_event_is_not_part_of_its_instance(self, backend, stream):
        [event] = await backend.log.append(stream, "K", [message(stream, "K")], expected_last_seq=0)
        retried = message(stream, "K")
        await backend.publish(f"{retried.subject}.retry", retried.data)
        assert await backend.log.last_seq(stream, "K") == event
        assert [e.seq for e in await read(backend.log, stream, "K")] == [event]

    async def test_causation_lookup_finds_the_events_a_cause_stored_since_a_time(self, backend, stream):
        before = datetime.now(timezone.utc) - timedelta(seconds=5)
        last = 0
        for cause in ("command:1", "command:2", "command:1"):
            [last] = await backend.log.append(stream, "K", [message(stream, "K", causation=cause)],
                                              expected_last_seq=last)
        found = await backend.log.caused_by(stream, "K", "command:1", before)
        assert len(found) == 2 and all(e.causation == "command:1" for e in found)
        assert await backend.log.caused_by(stream, "K", "command:3", before) == []
        later = datetime.now(timezone.utc) + timedelta(minutes=1)
        assert await backend.log.caused_by(stream, "K", "command:1", later) == []
        assert await backend.log.caused_by(stream, "other", "command:1", before) == []

    async def test_causation_lookup_goes_by_each_events_own_store_time(self, backend, stream):
        [first] = await backend.log.append(stream, "K", [message(stream, "K", causation="command:1")],
                                           expected_last_seq=0)
        await asyncio.sleep(0.01)
        between = datetime.now(timezone.utc)
        await asyncio.sleep(0.01)
        [second] = await backend.log.append(stream, "K", [message(stream, "K", causation="command:1")],
                                            expected_last_seq=first)
        assert [e.seq for e in await backend.log.caused_by(stream, "K", "command:1", between)] == [second]


class StateStoreContract:
    @pytest.fixture
    def backend(self) -> Backend:
        raise NotImplementedError

    @pytest.fixture
    def key(self) -> str:
        return f"agg.contract.k{next(_ids)}x{uuid.uuid4().hex[:8]}"

    async def test_a_key_never_written_has_no_state_and_revision_zero(self, backend, key):
        assert await backend.states.load(key) == StoredState(None, 0, 0)

    async def test_a_write_expecting_the_current_revision_is_stored(self, backend, key):
        first = await backend.states.save(key, '{"n": 1}', 3, 0)
        assert await backend.states.load(key) == StoredState('{"n": 1}', 3, first)
        second = await backend.states.save(key, '{"n": 2}', 5, first)
        assert second > first and await backend.states.load(key) == StoredState('{"n": 2}', 5, second)

    @pytest.mark.parametrize("stale", [0, -1, +1])
    async def test_a_write_expecting_another_revision_is_refused(self, backend, key, stale):
        revision = await backend.states.save(key, '{"n": 1}', 3, 0)
        with pytest.raises(StateConflict):
            await backend.states.save(key, '{"n": 2}', 4, 0 if stale == 0 else revision + stale)
        assert await backend.states.load(key) == StoredState('{"n": 1}', 3, revision)

    async def test_a_first_write_expecting_a_revision_is_refused(self, backend, key):
        with pytest.raises(StateConflict):
            await backend.states.save(key, '{"n": 1}', 1, 7)
        assert await backend.states.load(key) == StoredState(None, 0, 0)

    async def test_no_state_deletes_but_keeps_the_event_sequence_and_the_guard(self, backend, key):
        revision = await backend.states.save(key, '{"n": 1}', 3, 0)
        deleted = await backend.states.save(key, None, 4, revision)
        assert await backend.states.load(key) == StoredState(None, 4, deleted)
        with pytest.raises(StateConflict):
            await backend.states.save(key, '{"n": 2}', 5, revision)
        await backend.states.save(key, '{"n": 2}', 5, deleted)

    async def test_each_key_is_guarded_by_its_own_revision(self, backend, key):
        revision = await backend.states.save(key, '{"n": 1}', 1, 0)
        await backend.states.save(f"{key}b", '{"n": 1}', 1, 0)
        await backend.states.save(key, '{"n": 2}', 2, revision)


class ProcessorContract:
    """The command rules hold whichever stores the engine runs on."""

    @pytest.fixture
    def backend(self) -> Backend:
        raise NotImplementedError

    @pytest.fixture
    def engine(self, backend) -> Engine:
        return Engine(log=backend.log, states=backend.states)  # type: ignore[arg-type]

    @pytest.fixture
    def key(self) -> str:
        return f"k{next(_ids)}x{uuid.uuid4().hex[:8]}"

    async def balance(self, engine: Engine, key: str) -> tuple[int | None, int]:
        stored = await engine.states.load(aggregate_state_key(NAME, key))
        return balance(stored.value), stored.event_seq

    async def test_commands_are_decided_appended_and_folded(self, engine, key):
        for cmd in (command("open", key, balance=10), command("transfer_in", key, amount=5),
                    command("withdraw", key, amount=3)):
            assert (await engine.processor.process(cmd)).status == "accepted"
        assert (await engine.processor.process(command("withdraw", key, amount=99))).status == "rejected"
        assert await self.balance(engine, key) == (17, await engine.log.last_seq(STREAM, key))

    async def test_a_concurrent_append_makes_the_command_decided_again(self, engine, key):
        other = engine.twin()
        await engine.processor.process(command("open", key, balance=100))

        async def another_daemon_withdraws() -> None:
            engine.bank.before_decide = None
            await other.processor.process(command("withdraw", key, amount=80))

        engine.bank.before_decide = another_daemon_withdraws
        result = await engine.processor.process(command("withdraw", key, amount=80))
        assert result.status == "rejected" and (await self.balance(engine, key))[0] == 20

    async def test_a_redelivered_command_is_not_appended_twice(self, engine, key):
        await engine.processor.process(command("open", key, balance=1))
        first = command("transfer_in", key, amount=2)
        failpoints.configure("aggregate.after_append=error")
        try:
            with pytest.raises(FailpointError):
                await engine.processor.process(first)
        finally:
            failpoints.configure(None)
        again = command("transfer_in", key, seq=first.seq, redelivered=True, stored_at=first.stored_at, amount=2)
        result = await engine.twin().processor.process(again)
        assert result.status == "accepted" and result.events == ["funds_deposited"] * 2
        assert len(await read(engine.log, STREAM, key)) == 3
        assert (await self.balance(engine, key))[0] == 5

    async def test_the_event_consumer_catches_up_state_a_crash_left_behind(self, engine, key):
        await engine.processor.process(command("open", key, balance=1))
        failpoints.configure("aggregate.after_append=error")
        try:
            with pytest.raises(FailpointError):
                await engine.processor.process(command("deposit", key, amount=2))
        finally:
            failpoints.configure(None)
        last = await engine.log.last_seq(STREAM, key)
        await engine.twin().repository.catch_up(key, last)
        assert await self.balance(engine, key) == (3, last)


SIGNER = Signer(b"contract-signing-key-of-32-bytes")


class SigningContract:
    """With a key: events are signed with their place, and what does not verify is never read."""

    @pytest.fixture
    def backend(self) -> Backend:
        raise NotImplementedError

    @pytest.fixture
    def signing(self, backend) -> Backend:
        return backend.signed(SIGNER)

    @pytest.fixture
    def stream(self) -> str:
        return f"s{next(_ids)}x{uuid.uuid4().hex[:8]}"

    @pytest.fixture
    def key(self) -> str:
        return f"agg.contract.k{next(_ids)}x{uuid.uuid4().hex[:8]}"

    async def test_appended_events_are_read_back_with_their_place_in_their_append(self, signing, stream):
        [first] = await signing.log.append(stream, "K", [message(stream, "K")], expected_last_seq=0)
        await signing.log.append(stream, "K", [message(stream, "K"), message(stream, "K")], expected_last_seq=first)
        assert [e.position for e in await read(signing.log, stream, "K")] == [
            Position(0, 0), Position(first, 0), Position(first, 1)]

    async def test_an_unsigned_or_altered_event_guards_appends_but_is_never_read(self, signing, stream):
        genuine = message(stream, "K")
        [first] = await signing.log.append(stream, "K", [genuine], expected_last_seq=0)
        # a genuine signature on other data, under a message id of its own (else the log drops it)
        copied = {**signed(genuine, SIGNER, Position(0, 0)).headers, "Nats-Msg-Id": f"m{uuid.uuid4().hex}"}
        altered = await signing.publish(genuine.subject, message(stream, "K").data, copied)
        unsigned = await signing.publish(genuine.subject, message(stream, "K").data, message(stream, "K").headers)
        assert await signing.log.last_seq(stream, "K") == unsigned > altered > first
        assert [e.seq for e in await read(signing.log, stream, "K")] == [first]
        [after] = await signing.log.append(stream, "K", [message(stream, "K")], expected_last_seq=unsigned)
        assert [e.seq for e in await read(signing.log, stream, "K")] == [first, after]
        assert [e.seq for e in await read(signing.log, stream, "K", after_seq=first)] == [after]

    async def test_a_copy_of_a_signed_event_is_dropped_or_never_read(self, signing, stream):
        genuine = message(stream, "K")
        [first] = await signing.log.append(stream, "K", [genuine], expected_last_seq=0)
        [second] = await signing.log.append(stream, "K", [message(stream, "K")], expected_last_seq=first)
        # a copy signed as the first was: JetStream drops it by its message id; the in-memory log keeps it
        await signing.publish(genuine.subject, genuine.data, signed(genuine, SIGNER, Position(0, 0)).headers)
        assert [e.seq for e in await read(signing.log, stream, "K")] == [first, second]

    async def test_causation_lookup_finds_only_signed_events(self, signing, stream):
        before = datetime.now(timezone.utc) - timedelta(seconds=5)
        [genuine] = await signing.log.append(stream, "K", [message(stream, "K", causation="command:1")],
                                             expected_last_seq=0)
        forged = message(stream, "K", causation="command:1")
        await signing.publish(forged.subject, forged.data, forged.headers)
        assert [e.seq for e in await signing.log.caused_by(stream, "K", "command:1", before)] == [genuine]

    async def test_an_unsigned_reader_still_reads_signed_events(self, signing, backend, stream):
        [first] = await signing.log.append(stream, "K", [message(stream, "K")], expected_last_seq=0)
        assert [e.seq for e in await read(backend.log, stream, "K")] == [first]

    async def test_a_signed_state_is_read_back(self, signing, key):
        revision = await signing.states.save(key, '{"n": 1}', 3, 0)
        assert await signing.states.load(key) == StoredState('{"n": 1}', 3, revision)
        deleted = await signing.states.save(key, None, 4, revision)
        assert await signing.states.load(key) == StoredState(None, 4, deleted)

    async def test_a_state_record_that_does_not_verify_is_no_state_at_its_revision(self, signing, key):
        forged = await signing.write_state(key, '{"n": 1000000}', 9, {})
        assert await signing.states.load(key) == StoredState(None, 0, forged)
        revision = await signing.states.save(key, '{"n": 1}', 3, forged)
        assert await signing.states.load(key) == StoredState('{"n": 1}', 3, revision)

    async def test_a_signed_state_moved_to_another_key_or_sequence_does_not_verify(self, signing, key):
        headers = {SIGNATURE: SIGNER.sign_state(key, '{"n": 1}', 3)}
        moved = await signing.write_state(f"{key}b", '{"n": 1}', 3, headers)
        assert await signing.states.load(f"{key}b") == StoredState(None, 0, moved)
        repaired = await signing.write_state(key, '{"n": 1}', 4, headers)
        assert await signing.states.load(key) == StoredState(None, 0, repaired)
