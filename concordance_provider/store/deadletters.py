"""Dead letters: messages no delivery could handle, kept with why, in stream CC_DEADLETTER.

Each is one JSON envelope on ``cc.deadletter.{consumer}``: the original subject, stream
sequence, headers and body (base64), the consumer and component, the delivery count and the
error text of the last attempt. Nothing is terminated before its dead letter is stored.
"""

from __future__ import annotations

import base64
from datetime import datetime, timezone

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.errors import NoRespondersError
from pydantic import BaseModel, Field

from ..failpoints import fail_point
from ..metrics import DEAD_LETTERS
from ..naming import DEADLETTER_PREFIX, DEADLETTER_STREAM
from .jetstream import StoredMessage, publish, read_all

log = structlog.get_logger(__name__)


def deadletter_config() -> StreamConfig:
    return StreamConfig(
        name=DEADLETTER_STREAM, subjects=[f"{DEADLETTER_PREFIX}.>"], retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE, allow_direct=True,
    )


class DeadLetter(BaseModel):
    consumer: str
    component: str
    reason: str
    deliveries: int
    stream: str
    stream_seq: int
    subject: str
    headers: dict[str, str] = Field(default_factory=dict)
    body_b64: str
    failed_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    seq: int = 0  # its own sequence in CC_DEADLETTER, filled in when read back

    @property
    def body(self) -> bytes:
        return base64.b64decode(self.body_b64)

    @classmethod
    def of(cls, msg: Msg, consumer: str, component: str, reason: str) -> "DeadLetter":
        meta = msg.metadata
        return cls(
            consumer=consumer, component=component, reason=reason, deliveries=meta.num_delivered,
            stream=meta.stream, stream_seq=meta.sequence.stream, subject=msg.subject,
            headers=dict(msg.headers or {}), body_b64=base64.b64encode(msg.data).decode(),
        )


def _read(stored: StoredMessage) -> DeadLetter:
    return DeadLetter.model_validate_json(stored.data).model_copy(update={"seq": stored.seq})


class DeadLetters:
    def __init__(self, nc: NATS) -> None:
        self._nc = nc

    async def store(self, letter: DeadLetter) -> int:
        fail_point("deadletter.before_store")
        # one dead letter per message, even if storing is retried after a lost ack
        msg_id = f"dl:{letter.stream}:{letter.stream_seq}:{letter.consumer}"
        subject, body = f"{DEADLETTER_PREFIX}.{letter.consumer}", letter.model_dump_json(exclude={"seq"}).encode()
        try:
            seq = await publish(self._nc, subject, body, {"Nats-Msg-Id": msg_id})
        except NoRespondersError:
            # Deleted from outside: creating it again loses nothing more, and storing never ends otherwise.
            await self._nc.jetstream().add_stream(deadletter_config())
            log.error("stream was missing; created again", stream=DEADLETTER_STREAM, lost="the dead letters it held")
            seq = await publish(self._nc, subject, body, {"Nats-Msg-Id": msg_id})
        DEAD_LETTERS.labels(letter.consumer).inc()
        return seq

    async def list(self, consumer: str | None = None) -> list[DeadLetter]:
        subject = f"{DEADLETTER_PREFIX}.{consumer}" if consumer else f"{DEADLETTER_PREFIX}.>"
        return [_read(m) for m in await read_all(self._nc, DEADLETTER_STREAM, subject)]

    async def get(self, seq: int) -> DeadLetter | None:
        found = [m for m in await read_all(self._nc, DEADLETTER_STREAM, f"{DEADLETTER_PREFIX}.>",
                                           after_seq=seq - 1) if m.seq == seq]
        return _read(found[0]) if found else None

    async def remove(self, js: JetStreamContext, seq: int) -> None:
        await js.delete_msg(DEADLETTER_STREAM, seq)
