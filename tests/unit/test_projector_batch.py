"""A projector's batch applied in log order under its checkpoint: the rules, then the batch run
against an in-memory read model, log and consumer (no server)."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import structlog

from concordance_provider.store.jetstream import WrongLastSequence
from concordance_provider.workers import checkpointed
from concordance_provider.store.jetstream import StoredMessage
from concordance_provider.workers.base import Poison, Retry, Settler
from concordance_provider.workers.batch_plan import (
    Delivery,
    in_log_order,
    known_adjacent,
    must_commit_first,
    split_done,
    start_after,
)
from concordance_provider.workers.checkpointed import CheckpointedBatch


def d(seq: int, delivery: int | None = None, first: bool = True) -> Delivery:
    return Delivery(seq, seq if delivery is None else delivery, first)


# -- the rules ------------------------------------------------------------------------------------

def test_a_batch_is_taken_in_log_order_with_one_delivery_per_event() -> None:
    batch = [d(7, 3), d(5, 9, first=False), d(6, 4), d(5, 2)]
    assert in_log_order(batch, lambda x: x) == [d(5, 9, first=False), d(6, 4), d(7, 3)]


def test_events_at_or_below_the_checkpoint_are_acked_at_once() -> None:
    done, rest = split_done([d(3), d(4), d(5)], 4, lambda x: x)
    assert done == [d(3), d(4)] and rest == [d(5)]


@pytest.mark.parametrize("a, b, adjacent", [
    (d(4, 10), d(5, 30, first=False), True),  # neighbours in the log
    (d(4, 10), d(9, 11), True),  # first deliveries one right after the other
    (d(4, 10), d(9, 12), False),  # someone was given a delivery between them
    (d(4, 10, first=False), d(9, 11), False),  # a redelivery: an event between may be held elsewhere
    (d(4, 10), d(9, 11, first=False), False),
])
def test_what_is_known_to_follow_without_asking_the_log(a: Delivery, b: Delivery, adjacent: bool) -> None:
    assert known_adjacent(a, b) is adjacent


def test_a_batch_starts_after_the_checkpoint_or_after_what_the_consumer_will_never_deliver_again() -> None:
    assert start_after(checkpoint=10, ack_floor=4, first=20) == 10
    assert start_after(checkpoint=0, ack_floor=900, first=950) == 900  # a new read model, an old consumer
    assert start_after(checkpoint=0, ack_floor=990, first=950) == 949  # never past the batch's own events


def test_a_commit_holds_at_most_the_limit_of_keys_unless_one_event_writes_more() -> None:
    assert not must_commit_first([], ["a", "b", "c"], 2)
    assert not must_commit_first(["a", "b"], ["a", "b"], 2)
    assert must_commit_first(["a", "b"], ["c"], 2)


# -- the batch run --------------------------------------------------------------------------------

@dataclass
class FakeMsg:
    seq: int
    dseq: int
    num_delivered: int = 1
    acks: int = 0
    naks: list[float | None] = field(default_factory=list)
    terms: int = 0
    is_acked: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b"{}"

    @property
    def subject(self) -> str:
        return f"cc.events.funds_deposited.bankaccount.A{self.seq}"

    @property
    def metadata(self) -> SimpleNamespace:
        return SimpleNamespace(sequence=SimpleNamespace(stream=self.seq, consumer=self.dseq),
                               num_delivered=self.num_delivered, stream="CC_EVENTS")

    def _settle(self) -> None:
        assert not self.is_acked, f"event {self.seq} settled twice"
        self.is_acked = True

    async def ack(self) -> None:
        self._settle()
        self.acks += 1

    async def nak(self, delay: float | None = None) -> None:
        self._settle()
        self.naks.append(delay)

    async def term(self) -> None:
        self._settle()
        self.terms += 1


def fetched(*seqs: int, first_delivery: int = 1, redelivered: tuple[int, ...] = ()) -> list[FakeMsg]:
    return [FakeMsg(s, first_delivery + i, 2 if s in redelivered else 1) for i, s in enumerate(seqs)]


class FakeReadModel:
    """A KV bucket with the checkpoint and its revision. ``race`` holds commits of another daemon,
    each (checkpoint, writes), made just before this one's next commit, which then fails its guard."""

    def __init__(self, checkpoint: int = 0) -> None:
        self.values: dict[str, str] = {}
        self.checkpoint_seq, self.revision = checkpoint, 1
        self.commits: list[tuple[int, dict]] = []
        self.race: list[tuple[int, dict]] = []
        self.gets: list[str] = []  # keys read one by one
        self.many: list[list[str]] = []  # keys read together

    async def get(self, key: str) -> str | None:
        self.gets.append(key)
        return self.values.get(key)

    async def get_many(self, keys: list[str]) -> dict[str, str | None]:
        self.many.append(list(keys))
        return {key: self.values.get(key) for key in keys}

    async def checkpoint(self) -> tuple[int, int]:
        return self.checkpoint_seq, self.revision

    async def apply(self, writes: dict, seq: int, revision: int) -> int:
        if self.race:
            self.write(*self.race.pop(0))
        if revision != self.revision:
            raise WrongLastSequence(10071, "wrong last sequence")
        self.commits.append((seq, dict(writes)))
        return self.write(seq, writes)

    def write(self, seq: int, writes: dict) -> int:
        for key, value in writes.items():
            if value is None:
                self.values.pop(key, None)
            else:
                self.values[key] = value
        self.checkpoint_seq, self.revision = seq, self.revision + len(writes) + 1
        return self.revision


class FakeLog:
    def __init__(self, events: list[int], ack_floor: int = 0, page: int = 1000) -> None:
        self.events = sorted(events)  # every event of the filter in the log
        self.asked: list[int] = []
        self.floor = ack_floor
        self.page = page  # the most events one answer holds

    async def events_after(self, seq: int, limit: int) -> tuple[list[StoredMessage], int | None]:
        self.asked.append(seq)
        found = [s for s in self.events if s > seq][:min(limit, self.page)]
        complete_to = found[-1] if found and found[-1] != self.events[-1] else None
        return [StoredMessage(s, f"cc.events.funds_deposited.bankaccount.A{s}", {}, b"{}", "") for s in found], complete_to

    async def ack_floor(self) -> int:
        return self.floor


class FakeDeadLetters:
    def __init__(self) -> None:
        self.stored: list[tuple[int, str]] = []

    async def store(self, letter) -> int:
        self.stored.append((letter.stream_seq, letter.reason))
        return len(self.stored)


@dataclass
class Projector:
    """Lists the sequences of the events it applies, reading its own writes. Its calls run one
    after another on one thread, as the in-process runtime's do; ``overlap`` runs them at once."""

    failing: dict[int, type[Exception]] = field(default_factory=dict)
    handled: list[int] = field(default_factory=list)
    keys_per_event: int = 0
    overlap: bool = False
    strict: bool = False  # fails an event that does not follow the last one it saw
    one_thread: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))

    async def call(self, seq: int, item, read, puts: dict) -> dict:
        if seq in self.failing:
            raise self.failing[seq](f"cannot handle {seq}")

        def component() -> None:
            seen = json.loads(read("seen") or "[]")
            if self.strict and seen and seen[-1] != seq - 1:
                raise Retry(f"{seq} does not follow {seen[-1]}")
            if self.overlap:
                time.sleep(0.002)  # the next call reads before this one writes
            self.handled.append(seq)
            puts["seen"] = json.dumps(seen + [seq])
            puts.update({f"extra.{seq}.{n}": "x" for n in range(self.keys_per_event)})

        if self.overlap:
            await asyncio.to_thread(component)
        else:
            await asyncio.get_running_loop().run_in_executor(self.one_thread, component)
        return puts

    async def finish(self, called: dict) -> dict:
        return called


@pytest.fixture
def settler() -> Settler:
    return Settler("PROJ_test", "projector", 3, FakeDeadLetters(), structlog.get_logger())  # type: ignore[arg-type]


def apply(batch: list[FakeMsg], model: FakeReadModel, log: FakeLog, projector: Projector, settle: Settler,
          stopping: bool = False, prefetch: tuple[str, ...] = (), previous: Delivery | None = None) -> CheckpointedBatch:
    event = asyncio.Event()
    if stopping:
        event.set()
    run = CheckpointedBatch(batch, event, handler=projector, read_model=model,  # type: ignore[arg-type]
                            log=log, settle=settle, logger=structlog.get_logger(),  # type: ignore[arg-type]
                            prefetch=list(prefetch), previous=previous)
    asyncio.run(run.run())
    return run


def seen(model: FakeReadModel) -> list[int]:
    return json.loads(model.values.get("seen", "[]"))


def test_a_batch_is_applied_in_log_order_in_one_commit_and_then_acked(settler: Settler) -> None:
    model, log, projector = FakeReadModel(10), FakeLog(list(range(11, 16))), Projector()
    batch = fetched(13, 11, 12, 15, 14)  # a fetch may bring them in any order
    apply(batch, model, log, projector, settler)
    assert seen(model) == [11, 12, 13, 14, 15]  # each read saw the uncommitted writes before it
    assert [seq for seq, _ in model.commits] == [15]
    assert all(m.acks == 1 for m in batch) and log.asked == []


def test_calls_made_at_once_are_made_again_when_they_read_before_the_writes_of_the_event_before(
        settler: Settler) -> None:
    model, log, projector = FakeReadModel(10), FakeLog(list(range(11, 21))), Projector(overlap=True)
    batch = fetched(*range(11, 21))
    apply(batch, model, log, projector, settler)
    assert seen(model) == list(range(11, 21)) and all(m.acks == 1 for m in batch)
    assert len(projector.handled) > 10  # some were made again


def test_a_call_that_failed_on_what_it_read_too_soon_is_made_again_and_not_counted(settler: Settler) -> None:
    model, log = FakeReadModel(10), FakeLog(list(range(11, 21)))
    projector = Projector(overlap=True, strict=True)
    batch = fetched(*range(11, 21))
    apply(batch, model, log, projector, settler)
    assert seen(model) == list(range(11, 21)) and all(m.acks == 1 for m in batch)
    assert settler._failures == {}


def test_events_already_applied_are_acked_without_being_handled(settler: Settler) -> None:
    model, log, projector = FakeReadModel(12), FakeLog(list(range(11, 15))), Projector()
    batch = fetched(11, 12, 13, 14)
    apply(batch, model, log, projector, settler)
    assert projector.handled == [13, 14] and all(m.acks == 1 for m in batch)


def test_events_of_other_types_between_are_found_in_the_log_or_known_from_the_delivery_order(
        settler: Settler) -> None:
    # 11, 14, 18 are the filter's; first deliveries one after the other need no question
    model, log, projector = FakeReadModel(10), FakeLog([11, 14, 18]), Projector()
    apply(fetched(11, 14, 18), model, log, projector, settler)
    assert seen(model) == [11, 14, 18] and log.asked == []
    # a redelivered batch is checked against the log
    model, log, projector = FakeReadModel(10), FakeLog([11, 14, 18]), Projector()
    apply(fetched(11, 14, 18, redelivered=(11, 14, 18)), model, log, projector, settler)
    assert seen(model) == [11, 14, 18] and log.asked == [10]


def test_the_next_batch_of_first_deliveries_follows_the_last_without_asking_the_log(settler: Settler) -> None:
    model, log, projector = FakeReadModel(10), FakeLog([11, 14, 18, 21, 25]), Projector()
    last = apply(fetched(11, 14, 18), model, log, projector, settler).last_settled
    assert last == Delivery(18, 3, True)
    apply(fetched(21, 25, first_delivery=4), model, log, projector, settler, previous=last)
    assert seen(model) == [11, 14, 18, 21, 25] and log.asked == []


def test_events_held_elsewhere_before_the_batch_are_read_from_the_log_and_applied_here(settler: Settler) -> None:
    model, log, projector = FakeReadModel(10), FakeLog(list(range(11, 16))), Projector()
    batch = fetched(13, 14, 15)
    apply(batch, model, log, projector, settler)
    assert seen(model) == [11, 12, 13, 14, 15] and [seq for seq, _ in model.commits] == [15]
    assert all(m.acks == 1 for m in batch)  # 11 and 12 are their holder's to ack


def test_a_hole_in_the_batch_is_read_from_the_log(settler: Settler) -> None:
    model, log, projector = FakeReadModel(10), FakeLog(list(range(11, 17))), Projector()
    batch = fetched(11, 12, 14, 15)
    batch[2].dseq, batch[3].dseq = 4, 5  # 13 went to another daemon, delivery 3
    apply(batch, model, log, projector, settler)
    assert seen(model) == [11, 12, 13, 14, 15] and [seq for seq, _ in model.commits] == [15]
    assert log.asked == [10]


def test_a_long_stretch_held_elsewhere_is_read_in_parts(settler: Settler) -> None:
    model, log, projector = FakeReadModel(10), FakeLog(list(range(11, 40)), page=8), Projector()
    batch = fetched(37, 38, 39)  # a dead daemon held 11..36
    apply(batch, model, log, projector, settler)
    assert seen(model) == list(range(11, 40)) and all(m.acks == 1 for m in batch)
    assert log.asked == [10, 18, 26, 34]


def test_events_below_the_consumers_ack_floor_are_not_applied(settler: Settler) -> None:
    # the read model is new; the consumer acked 1..20 long ago
    model, log, projector = FakeReadModel(0), FakeLog(list(range(1, 24)), ack_floor=20), Projector()
    batch = fetched(21, 22, 23)
    apply(batch, model, log, projector, settler)
    assert seen(model) == [21, 22, 23]


def test_when_another_daemon_commits_first_this_one_goes_on_from_its_checkpoint(settler: Settler) -> None:
    model, log, projector = FakeReadModel(10), FakeLog(list(range(11, 17))), Projector()
    model.race = [(13, {"seen": "[11, 12, 13]"})]
    batch = fetched(11, 12, 13, 14, 15)
    batch[1].dseq = 9  # 12 is held elsewhere too (a redelivery went there): both apply it
    apply(batch, model, log, projector, settler)
    # what this batch read and wrote before is not taken for what the other daemon wrote
    assert seen(model) == [11, 12, 13, 14, 15] and [seq for seq, _ in model.commits] == [15]
    assert all(m.acks == 1 for m in batch)


def test_a_checkpoint_moved_back_by_a_replay_sends_the_batch_back(settler: Settler) -> None:
    model, log, projector = FakeReadModel(10), FakeLog(list(range(11, 14))), Projector()
    model.race = [(0, {})]
    batch = fetched(11, 12, 13)
    apply(batch, model, log, projector, settler)
    assert all(m.naks == [None] and m.acks == 0 for m in batch)


def test_the_keys_one_batch_read_are_read_together_at_the_start_of_the_next(
        settler: Settler, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpointed, "PREFETCH_MIN_RUN", 3)
    model, log, projector = FakeReadModel(10), FakeLog(list(range(11, 17))), Projector()
    read = apply(fetched(11, 12, 13), model, log, projector, settler).keys_read
    assert read == {"seen"} and model.gets == ["seen"]  # once: then its own uncommitted write
    apply(fetched(14, 15, 16, first_delivery=4), model, log, projector, settler, prefetch=tuple(read))
    assert model.gets == ["seen"] and model.many == [["seen"]]
    assert seen(model) == [11, 12, 13, 14, 15, 16]


def test_a_failure_commits_the_events_before_it_and_sends_back_the_rest_after_its_backoff(settler: Settler) -> None:
    model, log = FakeReadModel(10), FakeLog(list(range(11, 16)))
    projector = Projector(failing={13: Retry})
    batch = fetched(11, 12, 13, 14, 15)
    apply(batch, model, log, projector, settler)
    assert seen(model) == [11, 12] and [seq for seq, _ in model.commits] == [12]
    assert batch[2].naks == [1.0] and batch[3].naks == batch[4].naks == [1.0]
    assert settler._failures == {13: 1}


def test_a_failing_event_is_dead_lettered_at_its_last_delivery_and_the_rest_go_on(settler: Settler) -> None:
    model, log = FakeReadModel(12), FakeLog(list(range(11, 16)))
    projector = Projector(failing={13: Retry})
    settler._failures[13] = 2  # failed twice before; three deliveries are allowed
    batch = fetched(13, 14, 15, redelivered=(13, 14, 15))
    apply(batch, model, log, projector, settler)
    assert batch[0].terms == 1 and settler.dead_letters.stored[0][0] == 13  # type: ignore[attr-defined]
    assert "after 3 attempts" in settler.dead_letters.stored[0][1]  # type: ignore[attr-defined]
    assert seen(model) == [14, 15] and [seq for seq, _ in model.commits] == [13, 15]  # past the dead one first
    assert batch[1].acks == batch[2].acks == 1


def test_an_event_that_is_not_one_is_dead_lettered_at_once_and_the_rest_go_on(settler: Settler) -> None:
    model, log = FakeReadModel(10), FakeLog(list(range(11, 14)))
    projector = Projector(failing={12: Poison})
    batch = fetched(11, 12, 13)
    apply(batch, model, log, projector, settler)
    assert seen(model) == [11, 13] and [seq for seq, _ in model.commits] == [11, 12, 13]
    assert batch[1].terms == 1 and batch[0].acks == batch[2].acks == 1


def test_an_event_held_elsewhere_that_fails_here_is_left_to_its_holder(settler: Settler) -> None:
    model, log = FakeReadModel(10), FakeLog(list(range(11, 15)))
    projector = Projector(failing={12: Retry})
    batch = fetched(11, 13, 14)
    batch[1].dseq, batch[2].dseq = 3, 4
    apply(batch, model, log, projector, settler)
    assert seen(model) == [11] and batch[0].acks == 1
    assert batch[1].naks == batch[2].naks == [checkpointed.THEIRS_FAILED_SECONDS]
    assert settler._failures == {} and settler.dead_letters.stored == []  # type: ignore[attr-defined]


def test_many_writes_are_committed_in_parts(settler: Settler, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpointed, "COMMIT_KEYS", 10)
    model, log = FakeReadModel(10), FakeLog(list(range(11, 16)))
    projector = Projector(keys_per_event=4)  # 5 keys an event: two events a commit
    batch = fetched(11, 12, 13, 14, 15)
    apply(batch, model, log, projector, settler)
    assert [seq for seq, _ in model.commits] == [12, 14, 15]
    assert all(len(writes) <= 10 for _, writes in model.commits)
    assert seen(model) == [11, 12, 13, 14, 15]
    assert [m.acks for m in batch] == [1] * 5


def test_on_shutdown_the_batch_goes_back_at_once(settler: Settler) -> None:
    model, log, projector = FakeReadModel(10), FakeLog(list(range(11, 14))), Projector()
    batch = fetched(11, 12, 13)
    apply(batch, model, log, projector, settler, stopping=True)
    assert projector.handled == [] and all(m.naks == [None] for m in batch)
