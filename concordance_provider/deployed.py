"""What `concordance deploy` placed on wasmCloud hosts, recorded in the KV bucket ``CC_DEPLOYED``,
so that `concordance undeploy` can remove it and `concordance status` can show it, from any
machine that reaches NATS.

One entry per component, keyed ``{application}.{component}``: its workload id, the host it was
started on, the image and the subject it answers on. `deploy --watch` updates the host when it
moves the workload to another.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timezone

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field, ValidationError

from .wash_host import HostError, workload_status

DEPLOYED_BUCKET = "CC_DEPLOYED"
KEY_TOKEN = re.compile(r"^[A-Za-z0-9_=-]+$")
STATE_TIMEOUT_SECONDS = 2.0


class DeployedWorkload(BaseModel):
    application: str
    component: str
    workload_id: str
    host_id: str
    image: str
    dispatch_subject: str
    lattice: str
    provider_id: str
    deployed_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def key(self) -> str:
        return deployed_key(self.application, self.component)


def deployed_key(application: str, component: str) -> str:
    for token in (application, component):
        if not KEY_TOKEN.match(token):
            raise ValueError(f"{token!r} cannot name a deployed workload: use letters, digits, '-', '_' or '='")
    return f"{application}.{component}"


async def _bucket(js: JetStreamContext, create: bool) -> KeyValue | None:
    try:
        return await js.key_value(DEPLOYED_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        if not create:
            return None
        return await js.create_key_value(bucket=DEPLOYED_BUCKET, history=1,
                                         description="workloads placed on wasmCloud hosts by concordance deploy")


async def record(js: JetStreamContext, workload: DeployedWorkload) -> None:
    kv = await _bucket(js, create=True)
    assert kv is not None
    await kv.put(workload.key, workload.model_dump_json().encode())


async def forget(js: JetStreamContext, application: str, component: str) -> None:
    kv = await _bucket(js, create=False)
    if kv is not None:
        await kv.purge(deployed_key(application, component))


async def deployed(js: JetStreamContext, application: str | None = None) -> list[DeployedWorkload]:
    """Every recorded workload (of one application), oldest key first; none if nothing was deployed."""
    kv = await _bucket(js, create=False)
    if kv is None:
        return []
    found = []
    for key in sorted(await _keys(js)):
        if application is not None and not key.startswith(f"{application}."):
            continue
        try:
            entry = await kv.get(key)
            found.append(DeployedWorkload.model_validate_json(entry.value or b""))
        except (NotFoundError, ValidationError):
            continue  # removed meanwhile, or not written by deploy
    return found


async def _keys(js: JetStreamContext) -> list[str]:
    """The bucket's keys, from its stream's subjects: nats-py's ``KeyValue.keys()`` can end before the
    first key when the server delivers everything before its consumer info returns (seen 5 times in
    300), which made ``deploy --watch`` take its application for undeployed. Purged keys are listed
    too; reading them finds nothing."""
    prefix = f"$KV.{DEPLOYED_BUCKET}."
    info = await js.stream_info(f"KV_{DEPLOYED_BUCKET}", subjects_filter=f"{prefix}>")
    return [subject[len(prefix):] for subject in (info.state.subjects or {})]


async def live_states(nc: NATS, workloads: list[DeployedWorkload]) -> list[str]:
    """Each workload's state as its host tells it now, asked of all hosts at once."""
    async def one(workload: DeployedWorkload) -> str:
        try:
            status = await workload_status(nc, workload.host_id, workload.workload_id, STATE_TIMEOUT_SECONDS)
        except HostError:
            return "host not answering"
        return status.state

    return list(await asyncio.gather(*(one(w) for w in workloads)))
