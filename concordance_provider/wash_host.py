"""The control API of a wasmCloud 2 host (`wash host`) over NATS: heartbeats, workload start, stop
and status, as JSON request/reply on ``runtime.host.{host_id}.workload.{verb}``.

A host beats on ``runtime.operator.heartbeat.{host_id}`` when it starts and every 15 s after; that
is how a host id is learnt. Long waits log a line every ``PROGRESS_SECONDS`` so that a user sees
what is being waited for.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, TypeVar

import structlog
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = structlog.get_logger(__name__)

HEARTBEAT_SUBJECT = "runtime.operator.heartbeat.*"
HEARTBEAT_SECONDS = 15  # a host beats when it starts and then this often
RUNNING = "WORKLOAD_STATE_RUNNING"
NOT_FOUND = "WORKLOAD_STATE_NOT_FOUND"
START_TIMEOUT_SECONDS = 120.0  # the first start pulls and compiles an image of about 20 MB
PROGRESS_SECONDS = 5.0

T = TypeVar("T")


class HostError(Exception):
    """A host that cannot be found or did not do what it was asked, with what to do about it."""


class WorkloadStatus(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    workload_id: str = Field("", alias="workloadId")
    workload_state: str = Field("", alias="workloadState")
    message: str | None = None

    @property
    def state(self) -> str:
        """``running``, ``not found``, ... as a user reads it."""
        return self.workload_state.removeprefix("WORKLOAD_STATE_").replace("_", " ").lower() or "unknown"


class WorkloadReply(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    workload_status: WorkloadStatus = Field(alias="workloadStatus")


async def with_progress(work: Awaitable[T], message: str, **context: Any) -> T:
    """Await ``work``, logging ``message`` with the seconds waited every ``PROGRESS_SECONDS``."""
    task = asyncio.ensure_future(work)
    waited = 0.0
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=PROGRESS_SECONDS)
            if done:
                return task.result()
            waited += PROGRESS_SECONDS
            log.info(message, waited_s=round(waited), **context)
    finally:
        task.cancel()


async def find_host(nc: NATS, timeout: float) -> str:
    """The id of the first wasmCloud host heard from."""
    sub = await nc.subscribe(HEARTBEAT_SUBJECT)
    log.info("waiting for a wasmCloud host's heartbeat", every_s=HEARTBEAT_SECONDS, timeout_s=round(timeout))
    try:
        msg = await with_progress(sub.next_msg(timeout=timeout), "still waiting for a host's heartbeat")
    except (NatsTimeout, asyncio.TimeoutError):
        raise HostError(f"no wasmCloud host sent a heartbeat within {timeout:.0f}s; start one with "
                        f"`wash host --scheduler-nats-url ... --data-nats-url ...`, or name one with --host-id") from None
    finally:
        await sub.unsubscribe()
    host_id = msg.subject.rsplit(".", 1)[1]
    log.info("host found", host=host_id)
    return host_id


async def host_alive(nc: NATS, host_id: str) -> bool:
    try:
        await nc.request(f"runtime.host.{host_id}.heartbeat", b"{}", timeout=5)
        return True
    except (NoRespondersError, NatsTimeout, asyncio.TimeoutError):
        return False


async def workload_request(nc: NATS, host_id: str, verb: str, body: dict[str, Any], timeout: float) -> WorkloadStatus:
    subject = f"runtime.host.{host_id}.workload.{verb}"
    try:
        msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    except NoRespondersError:
        raise HostError(f"no wasmCloud host {host_id} answers on {subject}") from None
    except (NatsTimeout, asyncio.TimeoutError):
        raise HostError(f"host {host_id} did not answer {verb} within {timeout:.0f}s") from None
    try:
        return WorkloadReply.model_validate_json(msg.data).workload_status
    except ValidationError:
        raise HostError(f"host {host_id} answered {verb} with {msg.data[:300]!r}") from None


async def workload_status(nc: NATS, host_id: str, workload_id: str, timeout: float = 10) -> WorkloadStatus:
    return await workload_request(nc, host_id, "status", {"workloadId": workload_id}, timeout)


async def stop_workload(nc: NATS, host_id: str, workload_id: str) -> WorkloadStatus:
    """Stop it; a workload the host does not have is already stopped."""
    return await workload_request(nc, host_id, "stop", {"workloadId": workload_id}, 30)


async def start_workload(nc: NATS, host_id: str, workload_id: str, request: dict[str, Any]) -> None:
    """Start the workload, replacing one of the same id (an earlier deploy's) on that host. The
    host pulls and compiles the image first, which can take tens of seconds: progress is logged."""
    try:
        if (await workload_status(nc, host_id, workload_id)).workload_state == RUNNING:
            await stop_workload(nc, host_id, workload_id)
    except HostError:
        pass  # not there yet
    log.info("starting workload; the host pulls and compiles its image", host=host_id, workload=workload_id)
    status = (await with_progress(
        workload_request(nc, host_id, "start", request, START_TIMEOUT_SECONDS),
        "host still pulling and compiling", host=host_id, workload=workload_id))
    if status.workload_state != RUNNING:
        raise HostError(f"host {host_id} did not start {workload_id}: {status.workload_state} {status.message or ''}".strip())
