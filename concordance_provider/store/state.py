"""Aggregate and process state in KV ``CC_STATE``, guarded by revision: the engine's ``StateStore``.

The value is the component's state, exactly as the contract says. The header
``Concordance-Event-Sequence`` records the CC_EVENTS sequence of the last event folded into
it, so redelivered events are recognised and stale state is caught up from the log. With a signing
key, ``Concordance-Signature`` signs the value with its key and that sequence; a record whose
signature does not hold is read as no state (see ``engine.persistence.verified_state``).
"""

from __future__ import annotations

import structlog
from nats.aio.client import Client as NATS

from ..engine.persistence import StateConflict, StoredState, verified_state
from ..naming import STATE_BUCKET
from ..signing import SIGNATURE, Signer
from .jetstream import WrongLastSequence, direct_get, publish

__all__ = ["EVENT_SEQUENCE", "StateStore", "StoredState"]

log = structlog.get_logger(__name__)

EVENT_SEQUENCE = "Concordance-Event-Sequence"


class StateStore:
    def __init__(self, nc: NATS, bucket: str = STATE_BUCKET, signer: Signer | None = None) -> None:
        self._nc = nc
        self._bucket = bucket
        self._signer = signer

    def _subject(self, key: str) -> str:
        return f"$KV.{self._bucket}.{key}"

    async def load(self, key: str) -> StoredState:
        msg = await direct_get(self._nc, f"KV_{self._bucket}", last_by_subj=self._subject(key))
        if msg is None:
            return StoredState(None, 0, 0)
        deleted = msg.headers.get("KV-Operation") in ("DEL", "PURGE")
        try:
            state = StoredState(None if deleted else msg.data.decode(), int(msg.headers.get(EVENT_SEQUENCE, 0)),
                                msg.seq)
        except ValueError as exc:  # not UTF-8, or no number: not a record the engine wrote
            log.error("unreadable state record; ignored, the state is folded from the log", key=key,
                      revision=msg.seq, error=str(exc))
            return StoredState(None, 0, msg.seq)
        return verified_state(self._signer, key, state, msg.headers.get(SIGNATURE))

    async def save(self, key: str, value: str | None, event_seq: int, revision: int) -> int:
        """Write (or delete, for None) if nobody wrote since ``revision``; raises StateConflict."""
        headers = {EVENT_SEQUENCE: str(event_seq), "Nats-Expected-Last-Subject-Sequence": str(revision)}
        if value is None:
            headers["KV-Operation"] = "DEL"
        if self._signer is not None:
            headers[SIGNATURE] = self._signer.sign_state(key, value, event_seq)
        try:
            return await publish(self._nc, self._subject(key), (value or "").encode(), headers)
        except WrongLastSequence as exc:
            raise StateConflict(str(exc)) from None
