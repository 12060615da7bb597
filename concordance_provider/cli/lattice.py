"""Deploying to wasmCloud 2 hosts: `deploy` and `undeploy`."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Optional

import typer

from ..deploy import DeployError, Placement, link, place, placements, undeploy as undeploy_all, watch
from ..logging import configure
from ..manifest import Manifest, ManifestError, load_manifest
from ..wash_host import HostError, find_host
from .common import NATS_URL, app, fail, nats_client, run

HEARTBEAT_WAIT_SECONDS = 30.0  # two heartbeats of a live host (--host-wait)

LATTICE = typer.Option("default", help="lattice of the Concordance daemon")
PROVIDER_ID = typer.Option("concordance", help="provider id the daemon serves")
LOG_LEVEL = typer.Option("info", help="debug, info, warning or error")


def _manifest(path: Path) -> Manifest:
    try:
        return load_manifest(path, need_files=False)
    except ManifestError as exc:
        fail(str(exc))


@app.command()
def deploy(
    manifest: Path = typer.Argument(..., help="wadm application YAML; each component names its source or an OCI image"),
    registry: Optional[str] = typer.Option(None, help="OCI registry to push the components built from source to, "
                                                      "e.g. 127.0.0.1:5001"),
    nats_url: str = NATS_URL,
    host_id: Optional[str] = typer.Option(None, help="the wash host to run on (default: the first heard from)"),
    host_wait: float = typer.Option(HEARTBEAT_WAIT_SECONDS, "--host-wait", min=1.0,
                                    help="without --host-id: how long to wait for a host's heartbeat "
                                         "(hosts beat every 15 s)"),
    lattice: str = LATTICE,
    provider_id: str = PROVIDER_ID,
    build_dir: Optional[Path] = typer.Option(None, help="where to build (default: build/ beside the manifest)"),
    insecure: Optional[bool] = typer.Option(None, help="plain-HTTP registry (default: only for loopback)"),
    watch_hosts: bool = typer.Option(False, "--watch", help="stay, and restart the workloads on a live host "
                                                           "whenever their host is gone"),
    log_level: str = LOG_LEVEL,
) -> None:
    """Build the components for wasmCloud, push them, start them on a wash host and link them to
    the daemon.

    A component with a source (trait concordance: source: DIR) is built and pushed to --registry;
    one without runs its OCI image (properties.image) as written. Where each runs is recorded in
    the KV bucket CC_DEPLOYED: `concordance status` shows it, `concordance undeploy` removes it.
    """
    configure(log_level, "console")
    app_manifest = _manifest(manifest)
    if insecure is None:
        insecure = (registry or "").split(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]")
    try:
        planned = placements(app_manifest, build_dir or manifest.parent / "build", registry, insecure, lattice)
        run(_deploy(nats_url, host_id, host_wait, lattice, provider_id, planned, watch_hosts))
    except (DeployError, HostError) as exc:
        fail(str(exc))


async def _deploy(nats_url: str, host_id: str | None, host_wait: float, lattice: str, provider_id: str,
                  planned: list[Placement], watch_hosts: bool) -> None:
    async with nats_client(nats_url) as nc:
        host = host_id or await find_host(nc, host_wait)
        await place(nc, host, planned, lattice, provider_id)
        for placement in planned:
            await link(nc, lattice, provider_id, placement)
        typer.echo(f"deployed {len(planned)} component(s) on host {host}")
        if watch_hosts:
            stopping = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
            await watch(nc, host, planned, lattice, provider_id, stopping)


@app.command()
def undeploy(
    manifest: Path = typer.Argument(..., help="the application YAML that was deployed"),
    nats_url: str = NATS_URL,
    host_id: Optional[str] = typer.Option(None, help="the host of a workload that CC_DEPLOYED has no record of"),
    lattice: str = LATTICE,
    provider_id: str = PROVIDER_ID,
    log_level: str = LOG_LEVEL,
) -> None:
    """Remove what `concordance deploy` put on the lattice: unlink each component from the
    daemons, stop its workload on its host and forget it.

    Commands and events for the components wait in their streams, nothing is lost: a later deploy
    (or `concordance up` with the manifest) takes them up. A `deploy --watch` still running ends at
    the next heartbeat of a host (within 15 s).
    """
    configure(log_level, "console")
    app_manifest = _manifest(manifest)
    lines = run(_undeploy(nats_url, app_manifest, lattice, provider_id, host_id))
    for line in lines:
        typer.echo(line)
    typer.echo(f"undeployed {len(lines)} component(s) of {app_manifest.name}")


async def _undeploy(nats_url: str, app_manifest: Manifest, lattice: str, provider_id: str,
                    host_id: str | None) -> list[str]:
    async with nats_client(nats_url) as nc:
        try:
            return await undeploy_all(nc, app_manifest, lattice, provider_id, host_id)
        except DeployError as exc:
            fail(str(exc))
