"""Which fetched commands may be decided: the rule on stored earlier commands, and dispatch."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from concordance_provider.engine.memory import InMemoryEventLog, InMemoryStateStore
from concordance_provider.links import parse_interest
from concordance_provider.store.commands import CommandQueue, command_key, must_wait
from concordance_provider.workers.aggregate import AggregateWorker
from concordance_provider.workers.base import ORDER_HOLD_SECONDS, ORDER_WAIT_SECONDS, dispatch_by_key
from concordance_provider.workers.held import HeldCommands
from fakes.bank import STREAM, FakeBank


# -- the key of a command body ----------------------------------------------------------------

@pytest.mark.parametrize("body, key", [
    (b'{"command_type": "deposit_funds", "key": "ABC", "data": {}}', "ABC"),
    (b'{"key": ""}', ""),
    (b'{"command_type": "deposit_funds"}', None),
    (b'{"key": 42}', None),
    (b'["key", "ABC"]', None),
    (b"{not json", None),
    (b"\xff\xfe", None),
    (b"[" * 100_000, None),
])
def test_a_command_key_is_its_string_key_field_or_none(body: bytes, key: str | None) -> None:
    assert command_key(body) == key


# -- the rule -------------------------------------------------------------------------------------

def test_nothing_waits_when_only_the_batch_is_stored() -> None:
    batch = [(3, "A"), (4, "B"), (5, "A")]
    assert set(must_wait(batch, batch)) == set()


def test_an_earlier_command_stored_elsewhere_holds_back_its_key_only() -> None:
    batch = [(21, "A"), (22, "B"), (41, "A")]
    stored = [(1, "A"), (21, "A"), (22, "B"), (41, "A")]
    assert set(must_wait(batch, stored)) == {21, 41}


def test_only_commands_after_the_one_held_elsewhere_wait() -> None:
    batch = [(5, "A"), (9, "A")]
    stored = [(5, "A"), (7, "A"), (9, "A")]
    assert set(must_wait(batch, stored)) == {9}


def test_a_later_command_stored_elsewhere_holds_back_nothing() -> None:
    assert set(must_wait([(5, "A")], [(5, "A"), (8, "A")])) == set()


def test_a_command_without_a_key_neither_waits_nor_holds_back() -> None:
    batch = [(4, None), (6, "A")]
    stored = [(1, None), (2, "B"), (4, None), (6, "A")]
    assert set(must_wait(batch, stored)) == set()


def test_finished_commands_are_not_stored_and_hold_back_nothing() -> None:
    # 1 and 2 of key A were acked: the queue no longer has them
    assert set(must_wait([(3, "A")], [(3, "A")])) == set()


# -- dispatch ------------------------------------------------------------------------------------

@dataclass
class FakeMsg:
    seq: int
    key: str | None
    num_delivered: int = 1
    naks: list[float | None] = field(default_factory=list)
    is_acked: bool = False
    subject: str = "cc.commands.bankaccount"
    delivery: int = 0  # the consumer's delivery sequence

    @property
    def metadata(self) -> SimpleNamespace:
        return SimpleNamespace(sequence=SimpleNamespace(stream=self.seq, consumer=self.delivery),
                               num_delivered=self.num_delivered)

    @property
    def data(self) -> bytes:
        return b"{}" if self.key is None else f'{{"key": "{self.key}"}}'.encode()

    acked: bool = False

    async def nak(self, delay: float | None = None) -> None:
        self.naks.append(delay)
        self.is_acked = True

    async def ack(self) -> None:
        self.acked = self.is_acked = True


def run(batch: list[FakeMsg], waiting: set[int] | None = None, unsettled: set[int] = frozenset(),
        stopping: bool = False) -> list[int]:
    """Dispatch ``batch``; return the sequences handled, in the order they were handled."""
    handled: list[int] = []

    async def handle(msg: FakeMsg) -> bool:
        handled.append(msg.seq)
        await asyncio.sleep(0)
        return msg.seq not in unsettled

    async def order(msgs: list[FakeMsg]) -> set[int]:
        assert waiting is not None
        return waiting

    event = asyncio.Event()
    if stopping:
        event.set()
    asyncio.run(dispatch_by_key(batch, lambda m: m.key, handle, event,  # type: ignore[arg-type]
                                must_wait=order if waiting is not None else None))
    return handled


def test_waiting_commands_go_back_undecided_for_a_short_while() -> None:
    batch = [FakeMsg(21, "A"), FakeMsg(22, "B"), FakeMsg(41, "A")]
    assert run(batch, waiting={21}) == [22]
    assert batch[0].naks == batch[2].naks == [ORDER_WAIT_SECONDS]
    assert batch[1].naks == []


def test_after_a_command_that_is_not_settled_the_rest_of_its_key_wait() -> None:
    batch = [FakeMsg(1, "A"), FakeMsg(2, "A"), FakeMsg(3, "B"), FakeMsg(4, "A")]
    assert sorted(run(batch, waiting=set(), unsettled={1})) == [1, 3]
    assert batch[1].naks == batch[3].naks == [ORDER_WAIT_SECONDS]


def test_without_an_order_check_a_failure_holds_back_nothing() -> None:
    batch = [FakeMsg(1, "A"), FakeMsg(2, "A")]
    assert run(batch, unsettled={1}) == [1, 2]


def test_one_key_is_handled_in_stream_order_whatever_order_the_fetch_brought() -> None:
    batch = [FakeMsg(68, "A"), FakeMsg(48, "A", num_delivered=3), FakeMsg(50, "B")]
    handled = run(batch, waiting=set())
    assert handled.index(48) < handled.index(68)


def test_commands_without_a_key_are_each_alone() -> None:
    batch = [FakeMsg(1, None), FakeMsg(2, None)]
    assert sorted(run(batch, waiting=set(), unsettled={1})) == [1, 2]


def test_when_the_order_cannot_be_read_nothing_is_decided() -> None:
    batch = [FakeMsg(1, "A", num_delivered=2), FakeMsg(2, "B")]
    handled: list[int] = []

    async def broken(msgs: list[FakeMsg]) -> set[int]:
        raise TimeoutError("no answer")

    async def handle(msg: FakeMsg) -> bool:
        handled.append(msg.seq)
        return True

    asyncio.run(dispatch_by_key(batch, lambda m: m.key, handle, asyncio.Event(), must_wait=broken))  # type: ignore[arg-type]
    assert handled == []
    assert batch[0].naks == [2.0] and batch[1].naks == [1.0]  # the usual backoff, at most the outage wait


def test_on_shutdown_every_command_goes_back_at_once() -> None:
    batch = [FakeMsg(1, "A"), FakeMsg(2, "B")]
    assert run(batch, waiting=set(), stopping=True) == []
    assert batch[0].naks == batch[1].naks == [None]


def test_a_batch_without_keys_asks_the_server_nothing() -> None:
    batch = [FakeMsg(1, None), FakeMsg(2, None)]  # no connection: a request would fail
    assert not asyncio.run(CommandQueue("bankaccount").must_wait(batch))  # type: ignore[arg-type]


# -- waiting in place for another daemon -----------------------------------------------------------

def hold(batch: list[FakeMsg], waiting: dict[int, tuple[int, ...]], settles: set[int]) -> tuple[list[int], list]:
    """Dispatch with ``finished``: the earlier commands in ``settles`` leave the queue meanwhile."""
    handled: list[int] = []
    asked: list = []

    async def handle(msg: FakeMsg) -> bool:
        handled.append(msg.seq)
        return True

    async def order(msgs: list[FakeMsg]) -> dict[int, tuple[int, ...]]:
        return waiting

    async def finished(seqs, within: float) -> bool:
        asked.append((tuple(seqs), within))
        return set(seqs) <= settles

    asyncio.run(dispatch_by_key(batch, lambda m: m.key, handle, asyncio.Event(),  # type: ignore[arg-type]
                                must_wait=order, finished=finished))
    return handled, asked


def test_a_command_whose_earlier_one_is_settled_elsewhere_meanwhile_is_decided_at_once() -> None:
    batch = [FakeMsg(21, "A"), FakeMsg(22, "B"), FakeMsg(41, "A")]
    handled, asked = hold(batch, {21: (20,), 41: (20, 30)}, settles={20, 30})
    assert sorted(handled) == [21, 22, 41] and handled.index(21) < handled.index(41)
    assert all(msg.naks == [] for msg in batch)
    assert ((20,), ORDER_HOLD_SECONDS) in asked


def test_a_command_whose_earlier_one_stays_unsettled_goes_back_with_the_rest_of_its_key() -> None:
    batch = [FakeMsg(21, "A"), FakeMsg(22, "B"), FakeMsg(41, "A")]
    handled, _ = hold(batch, {21: (20,)}, settles=set())
    assert handled == [22]
    assert batch[0].naks == batch[2].naks == [ORDER_WAIT_SECONDS]


def test_waiting_in_place_needs_every_earlier_command_settled() -> None:
    batch = [FakeMsg(41, "A")]
    handled, _ = hold(batch, {41: (20, 30)}, settles={20})
    assert handled == [] and batch[0].naks == [ORDER_WAIT_SECONDS]


# -- batches cleared without asking the server -----------------------------------------------------

class CountingQueue(CommandQueue):
    """The queue with its stored commands given, counting the reads of them."""

    def __init__(self, stored: list[tuple[int, str | None]]) -> None:
        super().__init__("bankaccount")
        self.stored = stored
        self.reads = 0

    async def unfinished(self, nc, below_seq: int, page: int = 256) -> list[tuple[int, str | None]]:
        self.reads += 1
        return [(seq, key) for seq, key in self.stored if seq < below_seq]


def deliveries(*pairs: tuple[int, int], key: str = "A", num_delivered: int = 1) -> list[FakeMsg]:
    """Messages from (stream sequence, delivery sequence) pairs."""
    return [FakeMsg(seq, key, num_delivered=num_delivered, delivery=delivery) for seq, delivery in pairs]


def waits(queue: CountingQueue, batch: list[FakeMsg], settled: bool = True,
          held: dict[int, str | None] | None = None) -> dict[int, tuple[int, ...]]:
    """must_wait on ``batch``; then, unless ``settled``, one of its commands goes back unsettled."""
    for msg in batch:
        msg._client = None  # type: ignore[attr-defined]
    waiting = asyncio.run(queue.must_wait(batch, held))  # type: ignore[arg-type]
    if not settled:
        queue.unsettled()
    return waiting


def test_a_lone_daemon_reads_the_queue_once_then_follows_its_own_deliveries() -> None:
    queue = CountingQueue([])
    queue.stored = [(1, "A"), (2, "B")]
    assert waits(queue, deliveries((1, 1), (2, 2))) == {}
    queue.stored = [(3, "A"), (4, "A"), (5, "B")]
    assert waits(queue, deliveries((3, 3), (4, 4), (5, 5))) == {}
    assert waits(queue, deliveries((6, 6))) == {}
    assert queue.reads == 1


def test_a_delivery_to_another_daemon_in_between_makes_the_batch_read() -> None:
    queue = CountingQueue([(1, "A")])
    waits(queue, deliveries((1, 1)))
    queue.stored = [(2, "A"), (3, "A")]  # 2 went to another daemon, as delivery 2
    assert waits(queue, deliveries((3, 3))) == {3: (2,)}
    assert queue.reads == 2


def test_a_redelivered_command_makes_the_batch_read() -> None:
    queue = CountingQueue([(1, "A")])
    waits(queue, deliveries((1, 1)))
    queue.stored = [(2, "A"), (5, "A")]
    waits(queue, deliveries((2, 2), num_delivered=2) + deliveries((5, 3)))
    assert queue.reads == 2


def test_a_batch_not_all_settled_makes_the_next_one_read() -> None:
    queue = CountingQueue([(1, "A")])
    waits(queue, deliveries((1, 1)), settled=False)  # 1 went back to the server, still stored
    queue.stored = [(1, "A"), (2, "A")]
    assert waits(queue, deliveries((2, 2))) == {2: (1,)}


def test_a_command_held_elsewhere_keeps_every_later_batch_read_until_it_is_gone() -> None:
    # a dead daemon holds 1 (key A): batches of other keys are decided, but not trusted as clear
    queue = CountingQueue([(1, "A"), (2, "B")])
    assert waits(queue, deliveries((2, 2), key="B")) == {}
    queue.stored = [(1, "A"), (3, "A")]
    assert waits(queue, deliveries((3, 3))) == {3: (1,)}
    queue.stored = [(4, "A")]  # 1 redelivered and decided; 3 was handed back and decided
    waits(queue, deliveries((4, 6)))
    assert queue.reads == 3


def test_a_batch_ending_in_a_redelivery_is_not_trusted_as_a_frontier() -> None:
    # the consumer may have first-delivered later commands (to another daemon) before this redelivery
    queue = CountingQueue([(1, "A")])
    waits(queue, deliveries((1, 5), num_delivered=2))
    queue.stored = [(3, "A"), (4, "A")]  # 3 was first delivered elsewhere, as delivery 4
    assert waits(queue, deliveries((4, 6))) == {4: (3,)}


# -- batches dispatched beside each other ---------------------------------------------------------

def test_commands_held_from_an_earlier_batch_are_not_waited_for_on_the_server() -> None:
    queue = CountingQueue([(1, "A"), (2, "A"), (3, "B")])
    batch = [FakeMsg(2, "A", delivery=2), FakeMsg(3, "B", delivery=3)]
    assert waits(queue, batch, held={1: "A"}) == {}  # 1 is being decided here: 2 follows it in process
    queue.stored = [(1, "A"), (4, "A")]
    assert waits(queue, [FakeMsg(4, "A", delivery=4)], held={1: "A"}) == {}
    assert queue.reads == 1  # the batch was clear: the next one needed no read


def test_a_command_held_elsewhere_still_waits_beside_those_held_here() -> None:
    queue = CountingQueue([(1, "A"), (2, "A"), (3, "A")])  # 1 held elsewhere, 2 held here
    assert waits(queue, [FakeMsg(3, "A", delivery=3)], held={2: "A"}) == {3: (1,)}


def test_a_command_that_goes_back_unsettled_makes_the_next_batch_read() -> None:
    queue = CountingQueue([(1, "A")])
    waits(queue, deliveries((1, 1)))
    queue.unsettled()
    queue.stored = [(1, "A"), (2, "A")]
    assert waits(queue, deliveries((2, 2))) == {2: (1,)}


def dispatching(batch: list[FakeMsg], handle, must_wait, held: HeldCommands) -> asyncio.Task[None]:
    """``batch`` dispatched in the background, its commands held in ``held`` beside other batches."""
    return asyncio.create_task(dispatch_by_key(batch, lambda m: m.key, handle, asyncio.Event(),  # type: ignore[arg-type]
                                               must_wait=must_wait, held=held))


def overlapping(first: list[FakeMsg], second: list[FakeMsg], unsettled: set[int] = frozenset(),
                release_first_after_second: bool = True) -> tuple[list[str], list[int]]:
    """Dispatch ``first``, then ``second`` beside it, with commands held across them. The first batch's
    commands finish only once the second batch has started. Returns what happened, in order, and the
    sequences reported as gone back unsettled."""
    trace: list[str] = []
    gone_back: list[int] = []

    async def scenario() -> None:
        held = HeldCommands(on_unsettled=lambda: gone_back.append(-1))
        second_started = asyncio.Event()
        first_seqs = {m.seq for m in first}

        async def handle(msg: FakeMsg) -> bool:
            trace.append(f"start {msg.seq}")
            if msg.seq in first_seqs and release_first_after_second:
                await second_started.wait()
            await asyncio.sleep(0.01)
            trace.append(f"end {msg.seq}")
            return msg.seq not in unsettled

        async def order(msgs: list[FakeMsg], held_keys: dict) -> dict:
            return {}

        one = dispatching(first, handle, order, held)
        await asyncio.sleep(0.005)
        two = dispatching(second, handle, order, held)
        await asyncio.sleep(0.005)
        second_started.set()
        await asyncio.gather(one, two)
        gone_back.extend(m.seq for m in first + second if m.naks)

    asyncio.run(scenario())
    return trace, gone_back


def test_a_key_s_command_in_the_next_batch_is_decided_after_the_one_held_from_the_batch_before() -> None:
    trace, _ = overlapping([FakeMsg(1, "A")], [FakeMsg(2, "A"), FakeMsg(3, "B")])
    assert trace.index("end 1") < trace.index("start 2")
    assert trace.index("start 3") < trace.index("end 1")  # another key goes on meanwhile


def test_after_a_held_command_that_is_not_settled_the_next_batch_s_command_of_its_key_goes_back() -> None:
    first, second = [FakeMsg(1, "A")], [FakeMsg(2, "A")]
    trace, gone_back = overlapping(first, second, unsettled={1})
    assert "start 2" not in trace and second[0].naks == [ORDER_WAIT_SECONDS]
    assert -1 in gone_back  # the frontier was told


def test_a_later_command_held_here_does_not_hold_back_an_earlier_one_of_its_key() -> None:
    # 5 waits for its redelivered predecessor 3, which comes in the next batch: 3 must not wait for 5
    trace, _ = overlapping([FakeMsg(5, "A")], [FakeMsg(3, "A", num_delivered=2)])
    assert trace.index("start 3") < trace.index("end 5")


def test_a_command_held_when_the_batch_was_checked_is_followed_even_if_it_finishes_before_the_batch_s_turn() -> None:
    # 1 is held while the next batch's order check reads the queue, and goes back unsettled meanwhile:
    # the check counted it as held here, so 2 must still see that it did not settle
    first, second = [FakeMsg(1, "A")], [FakeMsg(2, "A", delivery=2)]
    handled: list[int] = []

    async def scenario() -> None:
        held = HeldCommands(on_unsettled=lambda: None)
        checked = asyncio.Event()
        first_done = asyncio.Event()

        async def handle(msg: FakeMsg) -> bool:
            handled.append(msg.seq)
            if msg.seq == 1:
                await checked.wait()
                return False
            return True

        async def no_wait(msgs: list[FakeMsg], held_keys: dict | None = None) -> dict:
            return {}

        async def slow_check(msgs: list[FakeMsg], held_keys: dict) -> dict:
            assert set(held_keys) == {1}
            checked.set()
            await first_done.wait()  # the read takes a while
            return {}

        one = dispatching(first, handle, no_wait, held)
        await asyncio.sleep(0.005)
        two = dispatching(second, handle, slow_check, held)
        await one
        first_done.set()
        await two

    asyncio.run(scenario())
    assert handled == [1]
    assert second[0].naks == [ORDER_WAIT_SECONDS]


def test_a_second_copy_of_a_held_command_is_acked_undecided_once_the_first_settles() -> None:
    # after a NATS restart the server may deliver a command again while its first copy is held here
    first, second = [FakeMsg(7, "A")], [FakeMsg(7, "A", num_delivered=2), FakeMsg(8, "A")]
    trace, _ = overlapping(first, second)
    assert trace.count("start 7") == 1  # decided once
    assert trace.index("end 7") < trace.index("start 8")
    assert second[0].naks == [] and second[0].acked


def test_a_second_copy_goes_back_when_the_first_did_not_settle() -> None:
    first, second = [FakeMsg(7, "A")], [FakeMsg(7, "A", num_delivered=2), FakeMsg(8, "A")]
    trace, _ = overlapping(first, second, unsettled={7})
    assert trace.count("start 7") == 1 and "start 8" not in trace
    assert second[0].naks == [ORDER_WAIT_SECONDS] and second[1].naks == [ORDER_WAIT_SECONDS]


# -- a command delivered again after its outcome was recorded ---------------------------------------

class RecordedOutcomes:
    """The outcome store's interface, in memory; commands up to ``stored_through`` were stored
    before the connection (None: not known), so a first delivery of one may have been decided."""

    def __init__(self, stored_through: int | None = 0) -> None:
        self.outcomes: dict[int, object] = {}
        self.stored_through = stored_through
        self.looked_up: list[int] = []

    async def record(self, seq: int, result: object) -> None:
        self.outcomes[seq] = result

    def may_be_recorded(self, seq: int) -> bool:
        return self.stored_through is None or seq <= self.stored_through

    async def recorded(self, seq: int, aggregate: str, key: str | None) -> bool:
        self.looked_up.append(seq)
        return seq in self.outcomes


def bank_worker(outcomes: RecordedOutcomes) -> AggregateWorker:
    interest = parse_interest({"ROLE": "aggregate", "INTEREST": STREAM, "NAME": "bank", "KEY": "account"})
    return AggregateWorker(interest, FakeBank(), InMemoryEventLog(), InMemoryStateStore(), outcomes,  # type: ignore[arg-type]
                           dead_letters=None)  # type: ignore[arg-type]


def delivery(seq: int, body: dict, num_delivered: int) -> SimpleNamespace:
    return SimpleNamespace(subject="cc.commands.bank", data=json.dumps(body).encode(), headers={},
                           metadata=SimpleNamespace(sequence=SimpleNamespace(stream=seq, consumer=seq),
                                                    num_delivered=num_delivered,
                                                    timestamp=datetime.now(timezone.utc)))


def test_a_command_delivered_again_after_its_outcome_was_recorded_is_not_decided_again() -> None:
    # a rejection leaves no event: without the outcome, the second delivery would decide it anew,
    # on the state later commands of its key made, and might accept it
    outcomes = RecordedOutcomes()
    worker = bank_worker(outcomes)

    async def scenario() -> None:
        await worker.on_command(delivery(1, {"command_type": "open", "key": "A", "data": {}}, 1))  # type: ignore[arg-type]
        withdraw = {"command_type": "withdraw", "key": "A", "data": {"amount": 50}}
        await worker.on_command(delivery(2, withdraw, 1))  # type: ignore[arg-type]
        assert outcomes.outcomes[2].status == "rejected"  # type: ignore[attr-defined]
        deposit = {"command_type": "deposit", "key": "A", "data": {"amount": 100}}
        await worker.on_command(delivery(3, deposit, 1))  # type: ignore[arg-type]
        await worker.on_command(delivery(2, withdraw, 2))  # type: ignore[arg-type]
        assert outcomes.outcomes[2].status == "rejected"  # type: ignore[attr-defined]
        assert json.loads((await worker.repository.current("A")).value or "{}")["balance"] == 100

    asyncio.run(scenario())


def test_a_first_delivery_of_a_command_stored_before_the_connection_keeps_its_recorded_outcome() -> None:
    # a server that restarted and lost its record of deliveries hands a decided command over again
    # as a first delivery; a command stored after the connection was made was never delivered before
    outcomes = RecordedOutcomes(stored_through=None)  # not looked yet: any command may be decided
    worker = bank_worker(outcomes)
    withdraw = {"command_type": "withdraw", "key": "A", "data": {"amount": 50}}

    async def scenario() -> None:
        await worker.on_command(delivery(1, {"command_type": "open", "key": "A", "data": {}}, 1))  # type: ignore[arg-type]
        await worker.on_command(delivery(2, withdraw, 1))  # type: ignore[arg-type]
        assert outcomes.outcomes[2].status == "rejected"  # type: ignore[attr-defined]
        outcomes.stored_through = 3  # the server restarts: commands 1 to 3 were stored before
        await worker.on_command(delivery(3, {"command_type": "deposit", "key": "A", "data": {"amount": 100}}, 1))  # type: ignore[arg-type]
        await worker.on_command(delivery(2, withdraw, 1))  # type: ignore[arg-type]
        assert outcomes.outcomes[2].status == "rejected"  # type: ignore[attr-defined]
        assert json.loads((await worker.repository.current("A")).value or "{}")["balance"] == 100
        looked = len(outcomes.looked_up)
        await worker.on_command(delivery(4, withdraw, 1))  # type: ignore[arg-type]
        assert outcomes.outcomes[4].status == "accepted"  # type: ignore[attr-defined]
        assert len(outcomes.looked_up) == looked  # stored since: decided without looking

    asyncio.run(scenario())
