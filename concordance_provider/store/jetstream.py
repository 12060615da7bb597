"""Thin helpers over JetStream features nats-py does not wrap: direct get and atomic batches."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS

from ..failpoints import fail_point, is_armed
from ..wire import random_uuid4

WRONG_LAST_SEQUENCE = 10071


class JetStreamError(Exception):
    """An error answer from the JetStream API."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{description} (error {code})")
        self.code = code


class WrongLastSequence(JetStreamError):
    """An optimistic-concurrency guard failed: someone appended first."""


class PayloadTooLarge(ValueError):
    """A message bigger than the server's maximum payload: it can never be published."""


def _check_size(nc: NATS, subject: str, data: bytes) -> None:
    if len(data) > nc.max_payload:
        raise PayloadTooLarge(f"{subject}: {len(data)} bytes is over the NATS maximum payload of {nc.max_payload}")


@dataclass(frozen=True)
class StoredMessage:
    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes
    time: str


def _raise_for(reply: dict[str, Any]) -> None:
    error = reply.get("error")
    if error:
        cls = WrongLastSequence if error.get("err_code") == WRONG_LAST_SEQUENCE else JetStreamError
        raise cls(int(error.get("err_code", 0)), str(error.get("description", "unknown error")))


def _stored(headers: dict[str, str] | None, data: bytes) -> StoredMessage:
    headers = dict(headers or {})
    return StoredMessage(
        seq=int(headers.get("Nats-Sequence", 0)),
        subject=headers.get("Nats-Subject", ""),
        headers=headers,
        data=data,
        time=headers.get("Nats-Time-Stamp", ""),
    )


async def direct_get(nc: NATS, stream: str, timeout: float = 5.0, **query: Any) -> StoredMessage | None:
    """One message by ``seq`` or ``last_by_subj`` (wildcards allowed); None if there is none."""
    reply = await nc.request(f"$JS.API.DIRECT.GET.{stream}", json.dumps(query).encode(), timeout=timeout)
    status = (reply.headers or {}).get("Status")
    if status == "404":
        return None
    if status:
        raise JetStreamError(int(status), (reply.headers or {}).get("Description", "direct get failed"))
    return _stored(reply.headers, reply.data)


async def direct_get_batch(
    nc: NATS, stream: str, subject: str, *, start_seq: int | None = None,
    start_time: str | None = None, limit: int = 256, timeout: float = 5.0,
) -> list[StoredMessage]:
    """Up to ``limit`` messages matching ``subject`` from a sequence or time, in one request."""
    query: dict[str, Any] = {"batch": limit, "next_by_subj": subject}
    if start_time is not None:
        query["start_time"] = start_time
    else:
        query["seq"] = max(start_seq or 1, 1)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    messages: list[StoredMessage] = []
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(query).encode(), reply=inbox)
        async with asyncio.timeout(timeout):
            async for msg in sub.messages:
                status = (msg.headers or {}).get("Status")
                if status in ("404", "204"):  # nothing matched / end of batch
                    break
                if status:
                    raise JetStreamError(int(status), (msg.headers or {}).get("Description", ""))
                messages.append(_stored(msg.headers, msg.data))
    finally:
        await sub.unsubscribe()
    return messages


def more_after(page: list[StoredMessage], size: int) -> bool:
    """Whether the subject has messages after this batch page: the server counts them on each
    message (``Nats-Num-Pending``), since it may end a page early; without the count, a full page may."""
    if not page:
        return False
    pending = page[-1].headers.get("Nats-Num-Pending")
    return int(pending) > 0 if pending is not None else len(page) == size


async def read_all(nc: NATS, stream: str, subject: str, *, after_seq: int = 0,
                   start_time: str | None = None) -> list[StoredMessage]:
    """Every message matching ``subject`` after ``after_seq`` (or from ``start_time``)."""
    found: list[StoredMessage] = []
    while True:
        if start_time is not None and not found:
            page = await direct_get_batch(nc, stream, subject, start_time=start_time)
        else:
            page = await direct_get_batch(nc, stream, subject, start_seq=(found[-1].seq if found else after_seq) + 1)
        found.extend(page)
        if len(page) < 256:
            return found


async def publish(nc: NATS, subject: str, data: bytes, headers: dict[str, str] | None = None,
                  timeout: float = 5.0) -> int:
    """Publish to a stream and wait for its ack; return the stream sequence."""
    _check_size(nc, subject, data)
    reply = await nc.request(subject, data, headers=headers, timeout=timeout)
    ack = json.loads(reply.data)
    _raise_for(ack)
    return int(ack["seq"])


async def publish_atomic(
    nc: NATS, messages: list[tuple[str, bytes, dict[str, str]]], first_headers: dict[str, str],
    timeout: float = 5.0,
) -> list[int]:
    """Append ``messages`` to one stream all-or-nothing (stream ``allow_atomic``).

    ``first_headers`` (for example an expected-last-sequence guard) go on the first message,
    where the server checks them for the whole batch. Returns the sequences assigned.
    """
    if not messages:
        return []
    for subject, data, _ in messages:
        _check_size(nc, subject, data)
    batch_id = random_uuid4().hex
    last = len(messages) - 1
    for index, (subject, data, headers) in enumerate(messages):
        batch_headers = {**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(index + 1)}
        if index == 0:
            batch_headers.update(first_headers)
        if index < last:
            await nc.publish(subject, data, headers=batch_headers)
            if index == 0 and is_armed("events.mid_batch"):
                await nc.flush()  # the first message is on the server: the crash strands a batch
                fail_point("events.mid_batch")
            continue
        batch_headers["Nats-Batch-Commit"] = "1"
        reply = await nc.request(subject, data, headers=batch_headers, timeout=timeout)
        ack = json.loads(reply.data)
        _raise_for(ack)
        final = int(ack["seq"])
        return list(range(final - last, final + 1))
    raise AssertionError("unreachable")
