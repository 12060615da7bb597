"""Read models of stateless handlers: one KV bucket each, written all-or-nothing per event.

Each write batch carries the handler's checkpoint ``_cc.checkpoint.{consumer}`` (the last event applied), guarded
by its revision, so a redelivered event is recognised and never applied to the read model twice.
"""

from __future__ import annotations

import re

from nats.aio.client import Client as NATS

from .jetstream import direct_get, publish_atomic

CHECKPOINT_PREFIX = "_cc.checkpoint"
_KV_KEY = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")


class InvalidReadModelKey(ValueError):
    pass


def is_valid_key(key: str) -> bool:
    return bool(_KV_KEY.fullmatch(key)) and not key.startswith(CHECKPOINT_PREFIX)


def check_key(key: str) -> str:
    if not is_valid_key(key):
        raise InvalidReadModelKey(f"read-model key {key!r} is not a valid KV key")
    return key


class ReadModel:
    def __init__(self, nc: NATS, bucket: str, consumer: str) -> None:
        self._nc = nc
        self.bucket = bucket
        self._checkpoint_key = f"{CHECKPOINT_PREFIX}.{consumer}"  # handlers may share a bucket

    def _subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    async def get(self, key: str) -> str | None:
        msg = await direct_get(self._nc, f"KV_{self.bucket}", last_by_subj=self._subject(check_key(key)))
        if msg is None or msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            return None
        return msg.data.decode()

    async def checkpoint(self) -> tuple[int, int]:
        """(last event sequence applied, revision of the checkpoint key)."""
        msg = await direct_get(self._nc, f"KV_{self.bucket}", last_by_subj=self._subject(self._checkpoint_key))
        return (int(msg.data or b"0"), msg.seq) if msg else (0, 0)

    async def apply(self, writes: dict[str, str | None], event_seq: int, checkpoint_revision: int) -> None:
        """Write every key (None deletes) and move the checkpoint to ``event_seq``, atomically."""
        messages = [
            (self._subject(check_key(k)), (v or "").encode(), {"KV-Operation": "DEL"} if v is None else {})
            for k, v in writes.items()
        ]
        guard = {"Nats-Expected-Last-Subject-Sequence": str(checkpoint_revision)}
        # the guard sits on the first message: make that the checkpoint itself
        messages.insert(0, (self._subject(self._checkpoint_key), str(event_seq).encode(), {}))
        await publish_atomic(self._nc, messages, guard)
