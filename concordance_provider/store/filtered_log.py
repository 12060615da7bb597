"""One consumer's view of the event log: the events of its filter after a sequence, and up to
where the consumer is done with them (its ack floor)."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS

from ..naming import EVENTS_STREAM
from .jetstream import StoredMessage, direct_get_batch, more_after


class FilteredLog:
    """CC_EVENTS as seen through one consumer's filter subjects."""

    def __init__(self, nc: NATS, consumer: str, filters: tuple[str, ...]) -> None:
        self._nc = nc
        self._consumer = consumer
        self._filters = filters

    async def events_after(self, seq: int, limit: int) -> tuple[list[StoredMessage], int | None]:
        """The events of the filter after ``seq``, in log order, and up to which sequence that list
        is complete (None: to the end of the log). One request per filter subject, all at once,
        each for at most ``limit`` events: the server reads only the messages of the subject."""
        pages = await asyncio.gather(*(direct_get_batch(self._nc, EVENTS_STREAM, f, start_seq=seq + 1, limit=limit)
                                       for f in self._filters))
        complete_to: int | None = None
        for page in pages:
            if more_after(page, limit):
                complete_to = page[-1].seq if complete_to is None else min(complete_to, page[-1].seq)
        found = sorted((m for page in pages for m in page), key=lambda m: m.seq)
        return [m for m in found if complete_to is None or m.seq <= complete_to], complete_to

    async def ack_floor(self) -> int:
        """The consumer's ack floor: every event it delivered up to there is acked or terminated,
        and it never delivers them again."""
        info = await self._nc.jetstream().consumer_info(EVENTS_STREAM, self._consumer)
        return info.ack_floor.stream_seq if info.ack_floor else 0
