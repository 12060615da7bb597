"""The command queue, CC_COMMANDS, read as the list of unfinished commands.

CC_COMMANDS is a work queue: a command leaves it when it is acked (decided) or terminated (its
dead letter stored). A command still stored is unfinished, whichever daemon holds it, even one
that died. So a fetched command may be decided only when no earlier command of its key is still
stored, apart from those fetched with it, which its worker decides first.

An aggregate's commands come on two subjects, ``cc.commands.{aggregate}`` (the key in the body)
and ``cc.commands.{aggregate}.{key}``; both are read, so one key's order holds across them.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Iterable, Mapping, Sequence

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from ..naming import COMMANDS_STREAM, InvalidName, command_filters, parse_command_subject
from .jetstream import direct_get, direct_get_batch, more_after

PAGE_MARGIN = 32  # room for commands held elsewhere, so one request usually reads them all
FIRST_LOOK_SECONDS = 0.005  # how soon a held-back command first looks whether its turn came
LONGEST_LOOK_SECONDS = 0.05  # and at most how long it goes between looks


def command_key(data: bytes) -> str | None:
    """The ``key`` of a command body; None for a body without one, which orders nothing."""
    try:
        body = json.loads(data)
    except Exception:  # any body at all, even one nested deeper than the parser goes
        return None
    key = body.get("key") if isinstance(body, dict) else None
    return key if isinstance(key, str) else None


def ordering_key(subject: str, data: bytes) -> str | None:
    """The key a command is ordered by: its subject's key, else its body's.

    A command whose body names another key than its subject is rejected undecided, so ordering it
    by the subject's key delays nothing that matters."""
    try:
        _, key = parse_command_subject(subject)
    except InvalidName:
        key = None
    return key if key is not None else command_key(data)


def must_wait(batch: Iterable[tuple[int, str | None]],
              stored: Iterable[tuple[int, str | None]]) -> dict[int, tuple[int, ...]]:
    """The batch's commands that may not be decided yet, each with the earlier commands it waits for.

    ``batch`` and ``stored`` are (stream sequence, key) pairs: the fetched commands, and the
    commands of the same aggregate still stored below the batch's last one. A command waits when
    an earlier command of its key is stored and not in the batch: someone else holds it, or it
    is waiting for its own redelivery.
    """
    batch = list(batch)
    fetched = {seq for seq, _ in batch}
    elsewhere: dict[str, list[int]] = {}
    for seq, key in stored:
        if key is not None and seq not in fetched:
            elsewhere.setdefault(key, []).append(seq)
    waiting = {}
    for seq, key in batch:
        earlier = tuple(s for s in elsewhere.get(key, ()) if s < seq) if key is not None else ()
        if earlier:
            waiting[seq] = earlier
    return waiting


class CommandQueue:
    """The stored (unfinished) commands of one aggregate."""

    def __init__(self, aggregate: str) -> None:
        self._subjects = command_filters(aggregate)
        self._nc: NATS | None = None
        # The consumer's delivery sequence through which no keyed command is stored but those this
        # process holds (see ``_follows_clear_batch``); None when that is not known.
        self._clear_through: int | None = None
        self._generation = 0  # moves on whenever a command held here goes back unsettled

    async def unfinished(self, nc: NATS, below_seq: int, page: int = 256) -> list[tuple[int, str | None]]:
        """(sequence, key) of each of the aggregate's commands still stored below ``below_seq``, on
        both its subjects, in stream order. The two subjects are read at once."""
        pages = await asyncio.gather(*(self._unfinished_on(nc, subject, below_seq, page)
                                       for subject in self._subjects))
        return sorted(found for subject_found in pages for found in subject_found)

    @staticmethod
    async def _unfinished_on(nc: NATS, subject: str, below_seq: int, page: int) -> list[tuple[int, str | None]]:
        """Those of one subject. A direct get by subject has no upper bound (the server ignores
        ``up_to_seq`` there), so pages are read until one passes ``below_seq``."""
        found: list[tuple[int, str | None]] = []
        start = 1
        while True:  # each page starts past the last: ends within (stored messages / page) + 1 reads
            messages = await direct_get_batch(nc, COMMANDS_STREAM, subject, start_seq=start, limit=page)
            for message in messages:
                if message.seq >= below_seq:
                    return found
                found.append((message.seq, ordering_key(message.subject, message.data)))
            if not more_after(messages, page):
                return found
            start = messages[-1].seq + 1

    async def must_wait(self, batch: list[Msg], held: Mapping[int, str | None] | None = None
                        ) -> dict[int, tuple[int, ...]]:
        """The fetched commands that must wait, each with the earlier ones of its key it waits for.

        ``held``: the commands this process holds from earlier batches (sequence to key); the
        batch's commands follow those of their key in process (``workers.held``), so they are not
        waited for here."""
        held = dict(held or {})
        clear_through, self._clear_through = self._clear_through, None
        if _follows_clear_batch(batch, clear_through):
            self._clear_through = _last_delivery(batch)
            return {}
        fetched = [(msg.metadata.sequence.stream, ordering_key(msg.subject, msg.data)) for msg in batch]
        if not any(key is not None for _, key in fetched):
            return {}
        last = max(seq for seq, _ in fetched)
        generation = self._generation
        self._nc = batch[0]._client  # the connection the batch came on (its acks go there too)
        stored = await self.unfinished(self._nc, last, page=len(batch) + len(held) + PAGE_MARGIN)
        in_batch = {seq for seq, _ in fetched}
        held_before = [(seq, key) for seq, key in held.items() if seq not in in_batch]
        last_delivered = max(batch, key=lambda msg: msg.metadata.sequence.consumer)
        if generation == self._generation and last_delivered.metadata.num_delivered == 1 and all(
                seq in in_batch or seq in held for seq, key in stored if key is not None):
            self._clear_through = last_delivered.metadata.sequence.consumer
        waiting = must_wait(fetched + held_before, stored)  # the held ones count as fetched with it
        return {seq: earlier for seq, earlier in waiting.items() if seq in in_batch}

    def unsettled(self) -> None:
        """A keyed command held here went back to the queue unsettled: stored again, so the next batch
        is read for."""
        self._clear_through = None
        self._generation += 1

    async def finished(self, seqs: Sequence[int], patience: float) -> bool:
        """Whether the commands ``seqs`` all leave the queue, waited for while they keep leaving:
        False once ``patience`` seconds pass in which none of them does.

        Another daemon deciding earlier commands of a key finishes each in milliseconds, but a batch
        of a backlog may take it seconds. Waiting here while they leave, instead of handing the later
        command back, keeps one key's commands flowing when several daemons share them: a command
        handed back is stored again, undecided, and every later command of its key fetched meanwhile
        must wait for it in turn, until a backlog does little but go round. Commands held by a daemon
        that died do not leave until their redelivery: then the wait ends after ``patience``.
        """
        pending = sorted(seqs)
        moved = time.monotonic()
        pause = FIRST_LOOK_SECONDS
        while True:
            # one key's commands leave in order, mostly: one look at the first still stored is enough
            while pending and await direct_get(self._nc, COMMANDS_STREAM, seq=pending[0]) is None:
                pending.pop(0)
                moved, pause = time.monotonic(), FIRST_LOOK_SECONDS
            if not pending:
                return True
            if time.monotonic() + pause > moved + patience:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, LONGEST_LOOK_SECONDS)


def _last_delivery(batch: list[Msg]) -> int:
    return max(msg.metadata.sequence.consumer for msg in batch)


def _follows_clear_batch(batch: list[Msg], clear_through: int | None) -> bool:
    """Whether no command outside ``batch`` can be stored before its commands, known without a read.

    ``clear_through`` is the last delivery of the previous batch, which was clear (no keyed command
    stored below its end but those held here) and ended in a first delivery; it is forgotten as
    soon as a command held here goes back unsettled. The consumer delivers each command first in
    stream order, so every command stored below this batch's end was first delivered before its
    last first delivery. If this batch is exactly the deliveries after ``clear_through``, all first
    deliveries, each such command was delivered either in this batch or by ``clear_through``, that
    is below the previous batch's end: held here (and followed in process), settled, or never
    stored. A delivery to another daemon, or a redelivery, breaks the run, and the batch is read for.
    """
    if clear_through is None or any(msg.metadata.num_delivered != 1 for msg in batch):
        return False
    deliveries = sorted(msg.metadata.sequence.consumer for msg in batch)
    return deliveries == list(range(clear_through + 1, clear_through + 1 + len(batch)))
