"""A fetched batch of a stateless handler's events, applied in log order under its checkpoint.

The batch is one unit. The checkpoint is read once; events at or below it are acked at once. The
rest are handled in log order from the event right after the checkpoint, with reads seeing the
writes of the events before them that are not committed yet; then the writes and the checkpoint
go in one atomic batch guarded by the checkpoint's revision, and the events are acked.

Several daemons share the consumer, and the server hands their pull requests the events in turn,
so a batch usually lacks events between its own: another daemon holds them, or a dead one did. A
missing event is read from the log and applied here too (the consumer's filter names which events
come between two). Each event still changes the read model once: only one of the daemons applying
it commits; the other finds the checkpoint moved, goes on from it, and its holder acks it when it
sees it below the checkpoint. Events the consumer will never deliver again (below its ack floor:
acked without this read model, before it existed) are not applied.

A failing event ends the run: the events before it are committed; a held one is retried or
dead-lettered as ``Settler`` decides (a dead one moves the checkpoint past it), and the rest of the
batch goes back to the server; one held elsewhere is its holder's to retry.

Each step through the daemon's event loop waits behind everything else the daemon does, so the
batch keeps up to ``CALL_WINDOW`` component calls under way: a call may start before the calls of
the events before it are done, reading their writes as they stand. When an event's turn comes, the
values it read are held against the writes of every event before it; if one differs, its call is
made again. Its effects are then checked and published in order. (The in-process runtime makes one
call after another on one thread, so a call always reads the finished writes before it.)

A read from the component's thread costs a trip through the event loop, and a projector reads the
same keys again and again (an account's balance): so the keys one batch read are fetched at the
start of the next in one request, and each value read or written is remembered for the batch.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Protocol, Union

import structlog
from nats.aio.msg import Msg

from ..failpoints import fail_point
from ..store.filtered_log import FilteredLog
from ..store.jetstream import StoredMessage, WrongLastSequence
from ..store.readmodel import ReadModel
from .base import BACKOFF_SECONDS, OUTAGE_BACKOFF_SECONDS, Settler, backoff
from .batch_plan import Delivery, in_log_order, known_adjacent, must_commit_first, split_done, start_after

log = structlog.get_logger(__name__)

COMMIT_KEYS = 500  # a run's writes are committed in parts of at most this many keys
COMMIT_SECONDS = 0.1  # and of at most this long a stretch of work, so the checkpoint keeps moving
READ_TIMEOUT_SECONDS = 5.0
PREFETCH_MIN_RUN = 8  # a run this long reads the keys of the last batch in one request first
THEIRS_FAILED_SECONDS = float(BACKOFF_SECONDS[0])  # the batch waits this long behind another's failing event
# Reading the log between held events asks for this many events per held one (and a margin): as
# many more as another daemon is handed in turn, and then some.
LOG_READ_FACTOR, LOG_READ_MARGIN = 3, 32

CALL_WINDOW = 16  # component calls under way at once in a batch

Item = Union[Msg, StoredMessage]  # an event delivered to this batch, or read from the log
Read = Callable[[str], "str | None"]
_UNREAD = object()


class Handler(Protocol):
    """Handles one event in two steps; each raises as a Settler handler does."""

    async def call(self, seq: int, msg: Item, read: Read, puts: dict[str, str | None]) -> Any:
        """The component call on the event (stream sequence ``seq``), writing to ``puts``."""

    async def finish(self, called: Any) -> dict[str, str | None]:
        """The call's writes (None deletes), once checked and what it reported published."""


@dataclass(eq=False)
class _Call:
    """One event's component call, under way or done; ``before``: the calls of the events
    before it that were under way when it started."""

    item: Item
    index: int  # in its run
    before: tuple["_Call", ...]
    puts: dict[str, str | None] = field(default_factory=dict)
    seen: dict[str, str | None] = field(default_factory=dict)  # what it read, key by key
    task: asyncio.Future[Any] | None = None


def where(msg: Msg) -> Delivery:
    meta = msg.metadata
    return Delivery(meta.sequence.stream, meta.sequence.consumer, meta.num_delivered == 1)


def seq_of(item: Item) -> int:
    return item.seq if isinstance(item, StoredMessage) else item.metadata.sequence.stream


class _HandBack(Exception):
    """Stop here: every message of the batch not yet settled goes back to the server."""

    def __init__(self, delay: float | None) -> None:
        super().__init__()
        self.delay = delay


class _Overtaken(Exception):
    """Another daemon committed first: go on from the checkpoint it wrote."""


def _raising(exc: BaseException) -> Callable[[Msg], Awaitable[None]]:
    async def handler(_msg: Msg) -> None:
        raise exc
    return handler


class CheckpointedBatch:
    def __init__(self, batch: list[Msg], stopping: asyncio.Event, *, handler: Handler, read_model: ReadModel,
                 log: FilteredLog, settle: Settler, logger: Any, prefetch: list[str] = (),
                 previous: Delivery | None = None) -> None:
        self._messages = in_log_order(batch, where)
        self._stopping = stopping
        self._handler = handler
        self._model = read_model
        self._log = log
        # the same failure counts as the worker's; a dead event moves the checkpoint past it
        self._settle = replace(settle, on_dead=self._past_dead)
        self._logger = logger
        self._checkpoint, self._revision = 0, 0
        self._pending: dict[str, str | None] = {}  # writes of handled events, not yet committed
        self._covered: list[Item] = []  # the events those writes are of
        self._prefetch = list(prefetch)
        # values read in this batch or committed by it, while the checkpoint is at revision ``_known_at``
        self._known: dict[str, str | None] = {}
        self._known_at = -1
        self.keys_read: set[str] = set()
        # the held event this worker last moved the checkpoint to (from its last batch, at first)
        self.last_settled = previous

    async def run(self) -> None:
        try:
            await self._apply_all()
        except _HandBack as back:
            await self._hand_back(back.delay)
        except asyncio.CancelledError:
            await self._hand_back(None)
            raise
        except Exception as exc:  # NATS away: nothing was committed that is not acked; all comes again
            self._logger.warning("could not apply the batch; handed back", error=str(exc))
            await self._hand_back(OUTAGE_BACKOFF_SECONDS)

    async def _apply_all(self) -> None:
        self._checkpoint, self._revision = await self._model.checkpoint()
        while True:  # each turn settles held events or finds the checkpoint moved on: ends by the last held
            done, held = split_done([m for m in self._messages if not m.is_acked], self._checkpoint, where)
            for msg in done:
                await _ack(msg, self._logger)
            if not held:
                return
            if self._stopping.is_set():
                raise _HandBack(None)
            try:
                await self._apply(await self._run_to(held))
            except _Overtaken:
                continue

    async def _run_to(self, held: list[Msg]) -> list[Item]:
        """The events of the filter from the one after the checkpoint up to the last held one, in
        log order: the held ones, and those between them read from the log (held by another
        daemon, or by none). Fewer, if the log's answer stops short (the rest is the next turn's)."""
        wheres = [where(m) for m in held]
        before = self.last_settled if self.last_settled and self.last_settled.seq == self._checkpoint else None
        follows = wheres[0].seq == self._checkpoint + 1 or (before is not None and known_adjacent(before, wheres[0]))
        if follows and all(map(known_adjacent, wheres, wheres[1:])):
            return list(held)  # nothing can lie between: the log need not be asked
        after = self._checkpoint
        logged, complete_to = await self._log.events_after(after, limit=LOG_READ_FACTOR * len(held) + LOG_READ_MARGIN)
        if logged and logged[0].seq < wheres[0].seq:  # events before the batch: maybe gone for good
            start = start_after(after, await self._log.ack_floor(), wheres[0].seq)
            if start != after:
                after = start
                logged, complete_to = await self._log.events_after(after, limit=LOG_READ_FACTOR * len(held) + LOG_READ_MARGIN)
        last = wheres[-1].seq if complete_to is None else min(wheres[-1].seq, complete_to)
        # a held event is taken even if the filter no longer names it (its link changed meanwhile)
        run: dict[int, Item] = {m.seq: m for m in logged if after < m.seq <= last}
        run.update((w.seq, msg) for w, msg in zip(wheres, held) if w.seq <= last)
        return [run[seq] for seq in sorted(run)]

    def _read(self, call: _Call, key: str, loop: asyncio.AbstractEventLoop) -> str | None:
        """A read-model value as an event's call sees it: the latest write of a call before it,
        then the writes not committed yet, then the bucket. Called from the component's thread."""
        self.keys_read.add(key)
        value: Any = _UNREAD
        for earlier in reversed(call.before):
            if key in earlier.puts:
                value = earlier.puts[key]
                break
        if value is _UNREAD:
            pending, known = self._pending, self._known  # the loop may swap them for new ones meanwhile
            if key in pending:
                value = pending[key]
            elif key in known:
                value = known[key]
            else:
                value = asyncio.run_coroutine_threadsafe(self._model.get(key), loop).result(READ_TIMEOUT_SECONDS)
                value = known.setdefault(key, value)  # unless a commit put a newer value there meanwhile
        call.seen.setdefault(key, value)
        return value

    def _stale(self, call: _Call) -> bool:
        """Whether the call read a value other than what the events before it wrote, now that
        all of them are merged into the pending writes."""
        return any(self._pending.get(key, self._known.get(key)) != value for key, value in call.seen.items())

    def _start(self, item: Item, index: int, before: tuple[_Call, ...], loop: asyncio.AbstractEventLoop) -> _Call:
        call = _Call(item, index, before)
        call.task = asyncio.ensure_future(self._handler.call(
            seq_of(item), item, lambda key: self._read(call, key, loop), call.puts))
        return call

    async def _result(self, call: _Call, loop: asyncio.AbstractEventLoop) -> dict[str, str | None]:
        """The event's writes once the calls before it are merged: its call made again if it read
        what they wrote before they were done (whether it failed or not)."""
        assert call.task is not None
        try:
            called, failure = await call.task, None
        except Exception as exc:  # it may have failed on what it read too soon: that is no failure
            called, failure = None, exc
        if self._stale(call):
            call = self._start(call.item, call.index, (), loop)
            assert call.task is not None
            called = await call.task
        elif failure is not None:
            raise failure
        return await self._handler.finish(called)

    async def _apply(self, run: list[Item]) -> None:
        if self._known_at != self._revision:  # another daemon committed since: what was read is stale
            keys = [*self._prefetch, *self.keys_read]
            # read after the checkpoint, as any read; a few events read what they need one by one
            self._known = await self._model.get_many(keys) if keys and len(run) >= PREFETCH_MIN_RUN else {}
            self._known_at = self._revision
        loop = asyncio.get_running_loop()
        under_way: collections.deque[_Call] = collections.deque()
        started, upcoming = time.monotonic(), 0
        try:
            while upcoming < len(run) or under_way:
                while upcoming < len(run) and len(under_way) < CALL_WINDOW and not self._stopping.is_set():
                    under_way.append(self._start(run[upcoming], upcoming, tuple(under_way), loop))
                    upcoming += 1
                if not under_way:  # stopping: what is handled is kept; the rest goes back
                    await self._commit()
                    raise _HandBack(None)
                call = under_way.popleft()
                if not self._covered:
                    started = time.monotonic()
                try:
                    writes = await self._result(call, loop)
                except Exception as exc:
                    await _drop(under_way)
                    await self._commit()
                    await self._failed(call.item, exc)
                    upcoming = call.index + 1  # dead-lettered: the checkpoint is past it
                    continue
                if must_commit_first(self._pending, writes, COMMIT_KEYS):
                    await self._commit()
                    started = time.monotonic()
                self._pending.update(writes)
                self._covered.append(call.item)
                if time.monotonic() - started >= COMMIT_SECONDS:
                    await self._commit()
        finally:
            await _drop(under_way)
        await self._commit()

    async def _failed(self, item: Item, exc: Exception) -> None:
        """Returns if the failed event is settled for good (dead-lettered); else the batch stops."""
        if isinstance(item, StoredMessage):
            self._logger.debug("an event held elsewhere failed here; its holder retries it",
                               event_seq=item.seq, error=str(exc))
            raise _HandBack(THEIRS_FAILED_SECONDS)
        if not await self._settle(item, _raising(exc)):
            # it comes again after its backoff: what follows it waits as long
            raise _HandBack(min(backoff(item.metadata.num_delivered), OUTAGE_BACKOFF_SECONDS))

    async def _commit(self) -> None:
        """The pending writes and the checkpoint at the last event they cover, in one atomic
        batch guarded by the checkpoint's revision; then the held ones among them are acked."""
        if not self._covered:
            return
        last = seq_of(self._covered[-1])
        fail_point("read_model.before_commit")
        try:
            self._revision = await self._model.apply(self._pending, last, self._revision)
        except WrongLastSequence:
            await self._overtaken(last)
        self._checkpoint = last
        self._known.update(self._pending)
        self._known_at = self._revision
        self.last_settled = None if isinstance(self._covered[-1], StoredMessage) else where(self._covered[-1])
        self._logger.debug("events applied", events=len(self._covered), writes=len(self._pending),
                           first=seq_of(self._covered[0]), last=last)
        for item in self._covered:
            if not isinstance(item, StoredMessage):
                await _ack(item, self._logger)
        self._pending, self._covered = {}, []

    async def _overtaken(self, last: int) -> None:
        """Another daemon moved the checkpoint first: drop what was handled and go on from the
        checkpoint it wrote (events up to it are acked as done). A checkpoint that did not move on
        was reset by a replay: the batch goes back to the server."""
        checkpoint, revision = await self._model.checkpoint()
        self._logger.debug("checkpoint moved by another daemon", event_seq=last, checkpoint=checkpoint)
        self._pending, self._covered = {}, []
        if checkpoint <= self._checkpoint:  # not moved on: reset by a replay, or moved back
            raise _HandBack(None)
        self._checkpoint, self._revision = checkpoint, revision
        raise _Overtaken()

    async def _past_dead(self, msg: Msg, _reason: str) -> None:
        """A dead-lettered event is settled too: the checkpoint moves past it, so the events after
        it are not kept waiting for it."""
        seq = where(msg).seq
        if seq > self._checkpoint:
            moved_by_us = self._known_at == self._revision
            self._revision = await self._model.apply({}, seq, self._revision)
            self._checkpoint = seq
            self.last_settled = where(msg)
            if moved_by_us:
                self._known_at = self._revision

    async def _hand_back(self, delay: float | None) -> None:
        for msg in self._messages:
            if not msg.is_acked:
                try:
                    await msg.nak(delay=delay)
                except Exception:  # noqa: BLE001 - redelivered after ack wait anyway
                    pass


async def _drop(calls: collections.deque[_Call]) -> None:
    """Calls under way whose results will not be used: stopped, and waited for."""
    tasks = [c.task for c in calls if c.task is not None]
    calls.clear()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _ack(msg: Msg, logger: Any) -> None:
    try:
        await msg.ack()
    except Exception as exc:  # handled; the redelivery will find it below the checkpoint
        logger.warning("could not ack message", subject=msg.subject, error=str(exc))
