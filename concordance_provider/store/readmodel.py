"""Read models of stateless handlers: one KV bucket each, written all-or-nothing with a checkpoint.

Each write batch carries the handler's checkpoint ``_cc.checkpoint.{consumer}`` (the last event
settled: applied, skipped or dead-lettered), guarded by its revision, so a redelivered event is
recognised and never applied to the read model twice. One commit may cover many events.
"""

from __future__ import annotations

import asyncio
import json
import re

from nats.aio.client import Client as NATS

from .jetstream import JetStreamError, direct_get, publish_atomic

CHECKPOINT_PREFIX = "_cc.checkpoint"
_KV_KEY = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")
# The server takes at most 1000 messages in one atomic batch; one of them is the checkpoint.
MAX_WRITES_PER_COMMIT = 999
MAX_KEYS_PER_GET = 1024  # the server answers a request for the last value of at most this many keys


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

    async def get_many(self, keys: list[str], timeout: float = 5.0) -> dict[str, str | None]:
        """The value of each valid key (None if it has none), in one request for up to
        ``MAX_KEYS_PER_GET`` keys: a direct get of the last message of each subject."""
        keys = [k for k in keys if is_valid_key(k)][:MAX_KEYS_PER_GET]
        found: dict[str, str | None] = dict.fromkeys(keys)
        if not keys:
            return found
        prefix = self._subject("")
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        try:
            query = {"multi_last": [self._subject(k) for k in keys], "batch": len(keys)}
            await self._nc.publish(f"$JS.API.DIRECT.GET.KV_{self.bucket}", json.dumps(query).encode(), reply=inbox)
            async with asyncio.timeout(timeout):
                async for msg in sub.messages:
                    headers = msg.headers or {}
                    status = headers.get("Status")
                    if status in ("404", "204"):  # none of them has a value / end of the answer
                        break
                    if status:
                        raise JetStreamError(int(status), headers.get("Description", "direct get failed"))
                    if headers.get("KV-Operation") not in ("DEL", "PURGE"):
                        found[headers.get("Nats-Subject", "")[len(prefix):]] = msg.data.decode()
        finally:
            await sub.unsubscribe()
        return found

    async def checkpoint(self) -> tuple[int, int]:
        """(last event sequence settled, revision of the checkpoint key)."""
        msg = await direct_get(self._nc, f"KV_{self.bucket}", last_by_subj=self._subject(self._checkpoint_key))
        return (int(msg.data or b"0"), msg.seq) if msg else (0, 0)

    def refusal(self, writes: dict[str, str | None]) -> str | None:
        """Why one event's writes can never be stored, or None: a key that is not a KV key, a value
        over the NATS maximum payload, more keys than one atomic write holds."""
        invalid = [k for k in writes if not is_valid_key(k)]
        if invalid:
            return f"handler wrote read-model keys that are not valid KV keys: {invalid}"
        if len(writes) > MAX_WRITES_PER_COMMIT:
            return f"handler wrote {len(writes)} read-model keys for one event; at most {MAX_WRITES_PER_COMMIT} fit"
        for key, value in writes.items():
            size = len((value or "").encode())
            if size > self._nc.max_payload:
                return (f"handler produced a message too large to store: {self._subject(key)}: {size} bytes "
                        f"is over the NATS maximum payload of {self._nc.max_payload}")
        return None

    async def apply(self, writes: dict[str, str | None], event_seq: int, checkpoint_revision: int) -> int:
        """Write every key (None deletes) and move the checkpoint to ``event_seq``, atomically;
        return the checkpoint's new revision. WrongLastSequence if the checkpoint moved since
        ``checkpoint_revision``."""
        messages = [
            (self._subject(check_key(k)), (v or "").encode(), {"KV-Operation": "DEL"} if v is None else {})
            for k, v in writes.items()
        ]
        guard = {"Nats-Expected-Last-Subject-Sequence": str(checkpoint_revision)}
        # the guard sits on the first message: make that the checkpoint itself
        messages.insert(0, (self._subject(self._checkpoint_key), str(event_seq).encode(), {}))
        return (await publish_atomic(self._nc, messages, guard))[0]
