"""The skeleton every worker shares: a durable pull consumer, dispatch, and settling.

A handler returns normally (ack), raises ``Retry`` (redeliver with backoff) or ``Poison`` (no
delivery can ever succeed). A message that fails its last allowed delivery, or is poison, is
stored as a dead letter and only then terminated. While a handler runs, the message is kept
alive with in-progress acks, so long component calls are not redelivered behind its back.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Awaitable, Callable, Collection, Hashable, Mapping, Sequence

import structlog
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ServiceUnavailableError

from ..engine.mapper import LoggedEvent, from_message
from ..engine.mapper import to_component as to_component_event  # noqa: F401  (the handlers' import)
from ..failpoints import fail_point
from ..links import DEFAULT_ACK_WAIT_MS, Interest
from ..naming import RETRY_FOR
from ..runtime import ComponentUnavailable
from ..signing import Forged, Signer
from ..store.deadletters import DeadLetter, DeadLetters
from ..store.jetstream import StoredMessage
from ..wire import BadMessage
from .held import HeldCommands, HeldSnapshot

log = structlog.get_logger(__name__)

BACKOFF_SECONDS = (1, 2, 5, 10, 30, 60)
OUTAGE_BACKOFF_SECONDS = 5.0  # a component host that comes back is used within seconds
ORDER_WAIT_SECONDS = 0.5  # a message waiting for an earlier one of its key looks again this soon
# A message waiting in place for the earlier ones of its key held elsewhere goes back after this
# long in which none of them was settled (see ``store.commands.CommandQueue.finished``).
ORDER_HOLD_SECONDS = 1.0
OVERLAP_FETCH_SECONDS = 0.05  # how long a fetch beside a running batch waits for messages
# How long a fetch with nothing being dispatched waits for messages. A stop waits for it to end, so
# it is short: an idle consumer then asks four times a second, a few microseconds of work each time.
IDLE_FETCH_SECONDS = 0.25
# A consumer off the command path (projectors, notifiers, an aggregate's event consumer) waits this
# long after a batch that emptied its queue, so that a trickle of events is taken a batch at a time:
# the costs of a fetch, a read-model commit and the socket writes are then shared by many events.
GATHER_SECONDS = 0.02
SETUP_RETRY_SECONDS = 1.0  # a consumer that could not be set up (NATS away) is tried again this soon
# What a request meets while NATS is away or JetStream is not answering yet.
_NATS_AWAY = (NatsTimeout, asyncio.TimeoutError, NoRespondersError, ServiceUnavailableError)


class Retry(Exception):
    """Handling failed; a later delivery may succeed."""


class Poison(Exception):
    """No delivery of this message can ever succeed."""


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    batch: int
    max_ack_pending: int = 1000
    ack_wait: float = DEFAULT_ACK_WAIT_MS / 1000  # seconds

    def config(self) -> ConsumerConfig:
        filters = list(self.filter_subjects)
        return ConsumerConfig(
            durable_name=self.durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,
            max_ack_pending=self.max_ack_pending,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
        )


def consumer_for(interest: Interest, stream: str, durable: str, filters: tuple[str, ...],
                 max_ack_pending: int = 1000) -> ConsumerSpec:
    """A consumer configured by the link's values (batch size, ack wait)."""
    return ConsumerSpec(stream, durable, filters, interest.max_messages_per_batch, max_ack_pending,
                        interest.ack_wait_ms / 1000)


def meant_for_another(msg: Msg, consumer: str) -> bool:
    """A retried dead event is delivered to every handler of its type; only one should act."""
    target = (msg.headers or {}).get(RETRY_FOR)
    return target is not None and target != consumer


def delivered_event(msg: Msg, signer: Signer | None = None) -> LoggedEvent:
    """The event a consumer delivered, or Poison if it is not one (anyone may publish there) or, with
    a key, not one the daemons wrote: unsigned, altered, or a copy published again."""
    return event_of(msg.metadata.sequence.stream, msg, signer)


def event_of(seq: int, msg: Msg | StoredMessage, signer: Signer | None) -> LoggedEvent:
    """``delivered_event`` for a message delivered or read from the log (``seq``: its sequence)."""
    stored_at = msg.metadata.timestamp if isinstance(msg, Msg) else _stored_time(msg)
    try:
        return from_message(seq, msg.subject, dict(msg.headers or {}), msg.data, signer, stored_at)
    except Forged as exc:
        raise Poison(f"forged event: {exc}") from None
    except BadMessage as exc:
        raise Poison(f"not a Concordance event: {exc}") from None


def _stored_time(msg: StoredMessage) -> datetime | None:
    try:
        return datetime.fromisoformat(msg.time) if msg.time else None
    except ValueError:
        return None


def backoff(num_delivered: int) -> float:
    return float(BACKOFF_SECONDS[min(num_delivered, len(BACKOFF_SECONDS)) - 1])


async def _keep_alive(batch: list[Msg], ack_wait: float) -> None:
    """Tell the server every fetched message is being worked on, including those still queued
    behind others of their key, so none is redelivered to another daemon meanwhile."""
    while True:
        await asyncio.sleep(ack_wait / 3)
        for msg in batch:
            if msg.is_acked:  # settled or handed back: progress would postpone a nak's redelivery to ack wait
                continue
            try:
                await msg.in_progress()
            except Exception:
                return  # connection gone: redelivery after ack wait is the fallback


@dataclass
class Settler:
    """Runs a handler on a message and acks, naks or dead-letters it; never raises."""

    consumer: str
    component: str
    max_deliveries: int
    dead_letters: DeadLetters
    logger: Any
    on_dead: Callable[[Msg, str], Awaitable[None]] | None = None  # e.g. answer a waiting client

    _failures: dict[int, int] = field(default_factory=dict)  # component failures by stream sequence

    async def __call__(self, msg: Msg, handler: Callable[[Msg], Awaitable[None]]) -> bool:
        """True once the message is settled for good (acked or dead-lettered), False if it will
        be redelivered."""
        seq = msg.metadata.sequence.stream
        try:
            await handler(msg)
        except asyncio.CancelledError:
            await self._nak(msg)
            raise
        except Poison as exc:
            return await self._bury(msg, str(exc))
        except Retry as exc:  # the component failed: that counts against the message
            failures = self._failures[seq] = self._failures.get(seq, 0) + 1
            if failures >= self.max_deliveries:
                return await self._bury(msg, f"{exc} (after {failures} attempts)")
            self.logger.warning("handling failed; will retry", subject=msg.subject, error=str(exc),
                                attempt=failures, max_deliveries=self.max_deliveries)
            await self._nak(msg)
            return False
        except ComponentUnavailable as exc:  # its host is away: wait for it, quietly
            self.logger.warning("component unavailable; will retry", subject=msg.subject, error=str(exc))
            await self._nak(msg, most=OUTAGE_BACKOFF_SECONDS)
            return False
        except Exception as exc:  # an outage or a bug, not the message's fault: never buried for it
            self.logger.exception("message handling failed; will retry", subject=msg.subject, error=str(exc))
            await self._nak(msg)
            return False
        self._failures.pop(seq, None)
        try:
            await msg.ack()
        except Exception as exc:  # handled; the redelivery will find it done
            self.logger.warning("could not ack message", subject=msg.subject, error=str(exc))
        return True

    async def _nak(self, msg: Msg, most: float | None = None) -> None:
        delay = backoff(msg.metadata.num_delivered)
        try:
            await msg.nak(delay=min(delay, most) if most is not None else delay)
        except Exception as exc:  # connection gone: the server redelivers after ack wait
            self.logger.warning("could not nak message", subject=msg.subject, error=str(exc))

    async def _bury(self, msg: Msg, reason: str) -> bool:
        try:
            seq = await self.dead_letters.store(DeadLetter.of(msg, self.consumer, self.component, reason))
            fail_point("deadletter.after_store")
            if self.on_dead is not None:
                await self.on_dead(msg, reason)
            await msg.term()
        except Exception as exc:  # keep the message until its dead letter is safely stored
            self.logger.error("could not store dead letter; will retry", subject=msg.subject, error=str(exc))
            await self._nak(msg)
            return False
        self._failures.pop(msg.metadata.sequence.stream, None)
        self.logger.error("message moved to dead letters", subject=msg.subject, reason=reason,
                          stream_seq=msg.metadata.sequence.stream, deadletter_seq=seq)
        return True


class ConsumerLoop:
    """Fetch from one durable consumer and hand each fetched batch to ``dispatch``."""

    def __init__(self, js: JetStreamContext, spec: ConsumerSpec,
                 dispatch: Callable[[list[Msg], asyncio.Event], Awaitable[None]], overlap: int = 1,
                 gather: float = 0.0) -> None:
        """``overlap``: how many fetched batches may be dispatched at once (the next is fetched while
        the last is dispatched); more than one only for a ``dispatch`` that keeps order across them.
        ``gather``: seconds to wait before the next fetch once a batch has emptied the queue."""
        self._js = js
        self.spec = spec
        self._dispatch = dispatch
        self._overlap = overlap
        self._gather = gather
        self._log = log.bind(consumer=spec.durable)
        self.last_turn = time.monotonic()  # when the loop last came round to fetch
        self._batches: list[tuple[float, list[Msg]]] = []  # those being dispatched, with when each began

    @property
    def in_flight(self) -> list[Msg]:
        """The messages being dispatched: a shutdown hands back what is unsettled."""
        return [msg for _, batch in self._batches for msg in batch]

    def turn_seconds(self) -> float:
        """How long the current turn (a fetch and the dispatch of its batch; the oldest batch being
        dispatched, with batches overlapping) has taken so far."""
        return time.monotonic() - min([self.last_turn] + [began for began, _ in self._batches])

    async def ensure(self) -> None:
        """Create the consumer, or update one that exists while keeping where it starts from
        (a replay may have moved it; JetStream does not allow changing that)."""
        wanted = self.spec.config()
        try:
            existing = (await self._js.consumer_info(self.spec.stream, self.spec.durable)).config
        except NotFoundError:
            await self._js.add_consumer(self.spec.stream, wanted)
            return
        wanted.deliver_policy = existing.deliver_policy
        wanted.opt_start_seq = existing.opt_start_seq
        wanted.opt_start_time = existing.opt_start_time
        await self._js.add_consumer(self.spec.stream, wanted)

    async def _subscribe(self, stopping: asyncio.Event) -> Any:
        """The consumer set up and a pull subscription on it; None if stopping came first. A server
        that goes away meanwhile (the daemon may be ready before every consumer is) is waited for."""
        while not stopping.is_set():
            try:
                await self.ensure()
                return await self._js.pull_subscribe_bind(durable=self.spec.durable, stream=self.spec.stream)
            except _NATS_AWAY as exc:
                self._log.warning("could not set up the consumer; trying again",
                                  error=str(exc) or type(exc).__name__)
                await wait_or_stop(stopping, SETUP_RETRY_SECONDS)
        return None

    async def run(self, stopping: asyncio.Event) -> None:
        sub = await self._subscribe(stopping)
        if sub is None:
            return
        self._log.info("consuming", filters=list(self.spec.filter_subjects))
        running: set[asyncio.Task[None]] = set()
        try:
            while not stopping.is_set():
                room = min(self.spec.batch, self.spec.max_ack_pending - len(self.in_flight))
                if running and (len(running) >= self._overlap or room < 1):
                    _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                self.last_turn = time.monotonic()
                # Beside a running batch, a pull request lingers only briefly: one open at a shutdown
                # would take in commands up to the process's end, to wait out the ack wait there.
                wait = OVERLAP_FETCH_SECONDS if running else IDLE_FETCH_SECONDS
                try:
                    batch = await sub.fetch(room, timeout=wait)
                except (NatsTimeout, asyncio.TimeoutError):
                    continue
                except Exception as exc:  # NATS away: wait and try again
                    self._log.warning("fetch failed", error=str(exc))
                    await asyncio.sleep(1.0)
                    continue
                if not batch:  # a short fetch can end with nothing and no timeout
                    continue
                turn = asyncio.create_task(self._turn(batch, stopping))
                # Fetch beside it only while more is waiting: at low load that fetch would cost a
                # pull request (and a socket write) per batch for nothing.
                if self._overlap == 1 or not batch[-1].metadata.num_pending:
                    await turn
                else:
                    running.add(turn)
                if self._gather and not running and not batch[-1].metadata.num_pending:
                    await wait_or_stop(stopping, self._gather)
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            await release(sub)

    async def _turn(self, batch: list[Msg], stopping: asyncio.Event) -> None:
        keeper = asyncio.create_task(_keep_alive(batch, self.spec.ack_wait))
        self._batches.append((self.last_turn, batch))
        try:
            await self._dispatch(batch, stopping)
        except Exception as exc:  # a bug must not silently stop this consumer
            self._log.exception("dispatch failed; continuing", error=str(exc))
        finally:
            self._batches = [(began, other) for began, other in self._batches if other is not batch]
            keeper.cancel()


async def wait_or_stop(stopping: asyncio.Event, seconds: float) -> None:
    """``seconds``, or less if ``stopping`` is set meanwhile."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def release(sub: Any, within: float = 2.0) -> int:
    """End a pull subscription so that nothing waits for the ack wait once the process is gone.

    The server keeps delivering to a pull request until it expires, and a message handed back
    while one is open comes straight back to it. So interest ends first (an UNSUB, then a round
    trip whose answer follows everything sent before it), and every message that still reaches
    the inbox meanwhile is handed back, for another daemon or the next start to take at once.
    Returns how many.
    """
    inbox, nc = sub._sub, sub._nc  # nats-py's core subscription on the inbox, and its connection
    handed = 0
    try:
        await nc._send_unsubscribe(inbox._id)  # as Subscription.drain starts; it then waits on a queue count
        flushed = asyncio.create_task(nc.flush(timeout=max(1, int(within))))
    except Exception:  # noqa: BLE001 - connection closed or going: nothing more can come
        flushed = None
    deadline = time.monotonic() + within
    try:
        while flushed is not None and time.monotonic() < deadline:
            try:
                msg = await inbox.next_msg(timeout=0.05)
            except Exception:  # noqa: BLE001 - nothing queued (or the connection is gone)
                if flushed.done():
                    break
                continue
            if msg.reply and msg.reply.startswith("$JS.ACK."):  # not a status message
                await hand_back(msg)
                handed += 1
    finally:
        if flushed is not None:
            flushed.cancel()
            await asyncio.gather(flushed, return_exceptions=True)
        try:
            await inbox.unsubscribe()
        except Exception:  # noqa: BLE001 - already gone with the connection
            pass
    if handed:
        log.info("messages handed back on stopping", count=handed)
    return handed


async def hand_back(msg: Msg, delay: float | None = None) -> None:
    """Give a message back to the server, redelivered at once or after ``delay`` seconds."""
    try:
        await msg.nak(delay=delay)
    except Exception:  # noqa: BLE001 - redelivered after ack wait anyway
        pass


async def dispatch_in_order(batch: list[Msg], handle: Callable[[Msg], Awaitable[bool]],
                            stopping: asyncio.Event) -> None:
    """One message after another; on shutdown the rest go back to the server."""
    for msg in batch:
        if stopping.is_set():
            await hand_back(msg)
        else:
            await handle(msg)


async def dispatch_by_key(
    batch: list[Msg], key_of: Callable[[Msg], Hashable | None], handle: Callable[[Msg], Awaitable[bool]],
    stopping: asyncio.Event, must_wait: Callable[..., Awaitable[Collection[int]]] | None = None,
    finished: Callable[[Sequence[int], float], Awaitable[bool]] | None = None,
    held: HeldCommands | None = None,
) -> None:
    """Handle messages of different keys concurrently and of one key in order; on shutdown,
    messages not yet started go back to the server. A message whose key is None is alone.

    With ``must_wait``, one key's messages are kept in order across batches and daemons too:
    it names the stream sequences of the batch that must wait for an earlier message of their
    key held elsewhere, and after a message that is not settled the rest of its key wait as
    well. A waiting message waits in place while ``finished`` sees the earlier messages it waits
    for (``must_wait`` maps each waiting sequence to them) being settled, and is decided once
    they all are; if ``ORDER_HOLD_SECONDS`` pass in which none is, it goes back to the server for
    ``ORDER_WAIT_SECONDS``, undecided.

    With ``held``, batches may overlap: the batch's messages are held there from the start, and
    each follows the messages of its key held from earlier batches (see ``workers.held``), which
    ``must_wait`` is given as its second argument (sequence to key).
    """
    # the commands held from earlier batches: the check counts them as fetched, and they are followed
    before = held.snapshot() if held is not None else None
    if held is not None:
        for msg in batch:
            held.hold(msg.metadata.sequence.stream, key_of(msg))
    try:
        await _dispatch_by_key(batch, key_of, handle, stopping, must_wait, finished, held, before)
    finally:
        if held is not None:  # what was not finished (a bug, a cancel) went back unsettled
            for msg in batch:
                if msg.metadata.sequence.stream not in before:
                    held.finish(msg.metadata.sequence.stream, False)


async def _dispatch_by_key(
    batch: list[Msg], key_of: Callable[[Msg], Hashable | None], handle: Callable[[Msg], Awaitable[bool]],
    stopping: asyncio.Event, must_wait: Callable[..., Awaitable[Collection[int]]] | None,
    finished: Callable[[Sequence[int], float], Awaitable[bool]] | None, held: HeldCommands | None,
    before: HeldSnapshot | None,
) -> None:
    def done(msg: Msg, settled: bool) -> None:
        # a second copy of a command held from an earlier batch leaves the first copy's record alone
        if held is not None and before is not None and msg.metadata.sequence.stream not in before:
            held.finish(msg.metadata.sequence.stream, settled)

    waiting: Collection[int] = ()
    if must_wait is not None:
        try:
            waiting = await (must_wait(batch, before.keys()) if before is not None else must_wait(batch))
        except Exception as exc:  # unknown order: decide nothing, look again soon
            log.warning("could not read what comes first; batch handed back", error=str(exc))
            for msg in batch:
                await hand_back(msg, min(backoff(msg.metadata.num_delivered), OUTAGE_BACKOFF_SECONDS))
                done(msg, False)
            return

    groups: dict[Hashable, list[Msg]] = defaultdict(list)
    # a fetch may bring a redelivered message after a newer one: each key goes in stream order
    for msg in sorted(batch, key=lambda m: m.metadata.sequence.stream):
        key = key_of(msg)
        groups[key if key is not None else (None, msg.metadata.sequence.stream)].append(msg)

    async def in_order(msgs: list[Msg]) -> None:
        blocked = False
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            if before is not None and seq in before:  # a second copy of a command held from before
                blocked = not await _second_copy(msg, before)
            elif stopping.is_set():
                await hand_back(msg)
                done(msg, False)
            # those held here from earlier batches first: most of the others have gone by then
            elif blocked or (before is not None and not await before.earlier_settled(seq, key_of(msg))) or (
                    seq in waiting and not await _turn_came(seq, waiting, finished)):
                log.debug("waiting for an earlier message of its key", subject=msg.subject, stream_seq=seq)
                await hand_back(msg, ORDER_WAIT_SECONDS)
                done(msg, False)
                blocked = True
            else:
                settled = await handle(msg)
                done(msg, settled)
                blocked = must_wait is not None and not settled

    await asyncio.gather(*(in_order(msgs) for msgs in groups.values()))


async def _second_copy(msg: Msg, before: HeldSnapshot) -> bool:
    """Wait for the first copy of the command to finish: if it settled, the command is done and this
    copy is acked, never decided again (a rejection leaves no event to show that it was decided);
    if not, this copy goes back too. Whether the command is settled."""
    settled = bool(await before.copy_settled(msg.metadata.sequence.stream))
    if settled:
        try:
            await msg.ack()
        except Exception:  # noqa: BLE001 - the first copy's ack already removed it
            pass
    else:
        await hand_back(msg, ORDER_WAIT_SECONDS)
    return settled


async def _turn_came(seq: int, waiting: Collection[int],
                     finished: Callable[[Sequence[int], float], Awaitable[bool]] | None) -> bool:
    """Whether the earlier messages ``seq`` waits for are all settled, none taking longer than
    ``ORDER_HOLD_SECONDS`` after the one before."""
    earlier = waiting.get(seq) if isinstance(waiting, Mapping) else None
    if finished is None or not earlier:
        return False
    try:
        return await finished(earlier, ORDER_HOLD_SECONDS)
    except Exception:  # noqa: BLE001 - unknown: wait the safe way, by handing it back
        return False
