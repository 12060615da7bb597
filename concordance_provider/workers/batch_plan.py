"""The rules for applying a fetched batch of one consumer's events in log order: pure, no I/O.

A batch is applied from the event right after the checkpoint (the last event settled: applied,
skipped or dead-lettered) to its last event, in log order. Between two of its events there may be
others of the consumer's filter, held by another daemon: those are read from the log. These rules
say where the batch starts, what is done already, and when no event can lie between two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Delivery:
    """Where a delivered event sits: in the log, and among the consumer's deliveries."""

    seq: int  # stream sequence
    delivery: int  # consumer (delivery) sequence: one more for every delivery, redeliveries too
    first: bool  # delivered for the first time


def in_log_order(batch: Iterable[T], where: Callable[[T], Delivery]) -> list[T]:
    """The batch sorted by stream sequence, one message per event (the latest delivery of it:
    an event redelivered while an earlier delivery still waited in the client comes twice)."""
    latest: dict[int, tuple[Delivery, T]] = {}
    for item in batch:
        d = where(item)
        if d.seq not in latest or latest[d.seq][0].delivery < d.delivery:
            latest[d.seq] = (d, item)
    return [latest[seq][1] for seq in sorted(latest)]


def split_done(held: Sequence[T], checkpoint: int, where: Callable[[T], Delivery]) -> tuple[list[T], list[T]]:
    """(events at or below the checkpoint: applied already, to ack at once; the rest)."""
    done = [m for m in held if where(m).seq <= checkpoint]
    return done, [m for m in held if where(m).seq > checkpoint]


def known_adjacent(a: Delivery, b: Delivery) -> bool:
    """Whether no event of the filter can lie between ``a`` and ``b`` (a before b), known
    without asking the log: they are neighbours in the log, or both were delivered for the
    first time one right after the other (first deliveries follow the log, so an event between
    them would have been delivered between them)."""
    return b.seq == a.seq + 1 or (a.first and b.first and b.delivery == a.delivery + 1)


def start_after(checkpoint: int, ack_floor: int, first: int) -> int:
    """Where a batch whose first event is ``first`` starts: after the checkpoint, or after the
    consumer's ack floor if that is later (events up to the floor are never delivered again: they
    were acked before this read model had them, or passed over when the consumer was made)."""
    return max(checkpoint, min(ack_floor, first - 1))


def must_commit_first(pending: Iterable[str], writes: Iterable[str], limit: int) -> bool:
    """Whether the writes gathered so far must be committed before adding ``writes``, so that
    one commit never holds more than ``limit`` keys (a single event's writes may exceed it
    alone; they are then committed by themselves)."""
    pending = set(pending)
    return bool(pending) and len(pending | set(writes)) > limit
