"""Aggregate and process state in KV ``CC_STATE``, guarded by revision: the engine's ``StateStore``.

The value is the component's state, exactly as the contract says. The header
``Concordance-Event-Sequence`` records the CC_EVENTS sequence of the last event folded into
it, so redelivered events are recognised and stale state is caught up from the log.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS

from ..engine.persistence import StateConflict, StoredState
from ..naming import STATE_BUCKET
from .jetstream import WrongLastSequence, direct_get, publish

__all__ = ["EVENT_SEQUENCE", "StateStore", "StoredState"]

EVENT_SEQUENCE = "Concordance-Event-Sequence"


class StateStore:
    def __init__(self, nc: NATS, bucket: str = STATE_BUCKET) -> None:
        self._nc = nc
        self._bucket = bucket

    def _subject(self, key: str) -> str:
        return f"$KV.{self._bucket}.{key}"

    async def load(self, key: str) -> StoredState:
        msg = await direct_get(self._nc, f"KV_{self._bucket}", last_by_subj=self._subject(key))
        if msg is None:
            return StoredState(None, 0, 0)
        deleted = msg.headers.get("KV-Operation") in ("DEL", "PURGE")
        return StoredState(
            None if deleted else msg.data.decode(),
            int(msg.headers.get(EVENT_SEQUENCE, 0)),
            msg.seq,
        )

    async def save(self, key: str, value: str | None, event_seq: int, revision: int) -> int:
        """Write (or delete, for None) if nobody wrote since ``revision``; raises StateConflict."""
        headers = {EVENT_SEQUENCE: str(event_seq), "Nats-Expected-Last-Subject-Sequence": str(revision)}
        if value is None:
            headers["KV-Operation"] = "DEL"
        try:
            return await publish(self._nc, self._subject(key), (value or "").encode(), headers)
        except WrongLastSequence as exc:
            raise StateConflict(str(exc)) from None
