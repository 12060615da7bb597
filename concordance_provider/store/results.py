"""Command outcomes in KV ``CC_RESULTS``, keyed ``{aggregate}.{key}.{seq}``.

A client that sent a command with request/reply got ``{"stream":"CC_COMMANDS","seq":N}`` back;
``concordance result N`` (or ``nats kv get CC_RESULTS bankaccount.ABC123.N``) tells it what became
of the command. The aggregate and key in the KV key let a NATS permission cover one instance's
outcomes (``$KV.CC_RESULTS.bankaccount.ABC123.>``). Every reader goes through ``read_result`` (one
outcome, optionally waited for) or ``stored_results`` (all of them).
Each outcome recorded is counted in the daemon's metrics, with the events it appended.
"""

from __future__ import annotations

import time
from collections.abc import Set

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ..metrics import COMMANDS, EVENTS_APPENDED
from ..naming import COMMANDS_STREAM, RESULTS_BUCKET, any_result_key, result_key, result_seq
from ..wire import CommandResult
from .jetstream import JetStreamError, StoredMessage, read_all

UNLINKED = "_unlinked"  # metrics label of aggregates nobody linked: clients choose those names
RESULTS_STREAM = f"KV_{RESULTS_BUCKET}"
RESULTS_SUBJECT_PREFIX = f"$KV.{RESULTS_BUCKET}."
RECHECK_SECONDS = 1.0  # a waiting reader also looks in the bucket this often, in case it missed the put
DELETED = ("DEL", "PURGE")


class ResultStore:
    def __init__(self, js: JetStreamContext, aggregates: Set[str] | None = None, nc: NATS | None = None) -> None:
        """``aggregates``: the linked aggregates' names (a live view), to keep metric labels to those;
        ``nc``: the connection to read outcomes on (``recorded``)."""
        self._js = js
        self._kv = None
        self._aggregates = aggregates
        self._nc = nc
        # The last command stored before this connection was made (None: not known yet). A server
        # that restarts can lose its record of deliveries and acks, and deliver a decided command
        # again as a first delivery; only a command stored before the connection can be one.
        self._stored_through: int | None = None
        self._connection = 0  # how many times the connection was lost: a late look counts for nothing

    def disconnected(self) -> None:
        """Until ``connected`` has looked again, any command may have been decided before."""
        self._connection += 1
        self._stored_through = None

    async def connected(self) -> None:
        """Note the commands stored so far: commands stored later were never delivered before."""
        connection = self._connection
        last_seq = (await self._js.stream_info(COMMANDS_STREAM)).state.last_seq
        if connection == self._connection:
            self._stored_through = last_seq

    def may_be_recorded(self, command_seq: int) -> bool:
        """Whether a first delivery of ``command_seq`` may still have been decided before."""
        return self._stored_through is None or command_seq <= self._stored_through

    async def recorded(self, command_seq: int, aggregate: str, key: str | None) -> bool:
        """Whether command ``command_seq`` has its outcome already: decided by an earlier delivery."""
        assert self._nc is not None
        return await read_result(self._nc, command_seq, aggregate=aggregate, key=key) is not None

    async def record(self, command_seq: int, result: CommandResult) -> None:
        """Store the outcome under ``{result.aggregate}.{result.key}.{command_seq}``."""
        if self._kv is None:
            self._kv = await self._js.key_value(RESULTS_BUCKET)
        await self._kv.put(result_key(result.aggregate, result.key, command_seq),
                           result.model_dump_json(exclude_none=True).encode())
        aggregate = result.aggregate
        if self._aggregates is not None and aggregate not in self._aggregates:
            aggregate = UNLINKED
        COMMANDS.labels(aggregate, result.status).inc()
        if result.status == "accepted":
            for event_type in result.events:
                EVENTS_APPENDED.labels(aggregate, event_type).inc()


def _subject(seq: int, aggregate: str | None, key: str | None) -> str:
    pattern = result_key(aggregate, key, seq) if aggregate is not None else any_result_key(seq)
    return RESULTS_SUBJECT_PREFIX + pattern


async def _last(nc: NATS, subject: str, timeout: float) -> bytes | None:
    """The stored outcome on ``subject`` (a pattern too). The subject goes in the API subject, so a
    permission on ``$JS.API.DIRECT.GET.KV_CC_RESULTS.$KV.CC_RESULTS.{aggregate}.{key}.>`` allows it."""
    reply = await nc.request(f"$JS.API.DIRECT.GET.{RESULTS_STREAM}.{subject}", b"", timeout=timeout)
    headers = reply.headers or {}
    status = headers.get("Status")
    if status == "404":
        return None
    if status:
        raise JetStreamError(int(status), headers.get("Description", "direct get failed"))
    return bytes(reply.data) if reply.data and headers.get("KV-Operation") not in DELETED else None


async def read_result(nc: NATS, seq: int, *, aggregate: str | None = None, key: str | None = None,
                      wait: float = 0.0, timeout: float = 5.0) -> bytes | None:
    """The stored outcome of command ``seq``, waiting up to ``wait`` seconds for it; None if none.

    With ``aggregate`` (and ``key``, None for a command without one) it reads exactly
    ``{aggregate}.{key}.{seq}``, which a per-key permission allows; without, it finds the seq
    whatever its aggregate and key (``*.*.{seq}``). A wait listens for the daemon's put on the
    outcome's subject, subscribed before the first look so no put falls between the two; it also
    looks again every ``RECHECK_SECONDS`` in case the subscription dropped the put.
    """
    subject = _subject(seq, aggregate, key)
    sub = await nc.subscribe(subject) if wait > 0 else None
    try:
        found = await _last(nc, subject, timeout)
        if found is not None or sub is None:
            return found
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=min(left, RECHECK_SECONDS))
            except nats.errors.TimeoutError:
                found = await _last(nc, subject, timeout)
                if found is not None:
                    return found
                continue
            if msg.data and (msg.headers or {}).get("KV-Operation") not in DELETED:
                return bytes(msg.data)
        return None
    finally:
        if sub is not None:
            await sub.unsubscribe()


async def stored_results(nc: NATS) -> dict[int, bytes]:
    """Every outcome still stored, by command sequence (for auditors: it reads the whole bucket)."""
    found: dict[int, bytes] = {}
    for stored in await read_all(nc, RESULTS_STREAM, f"{RESULTS_SUBJECT_PREFIX}>"):
        if stored.data and not _is_deleted(stored):
            found[result_seq(stored.subject)] = stored.data
    return found


def _is_deleted(stored: StoredMessage) -> bool:
    return stored.headers.get("KV-Operation") in DELETED
