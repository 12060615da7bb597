"""Deploying to wasmCloud 2 hosts: `deploy`."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Optional

import typer

from ..deploy import DeployError, build_and_push, find_host, link, place, watch
from ..logging import configure
from ..manifest import ManifestError, load_manifest
from .common import NATS_URL, app, fail, nats_client, run


@app.command()
def deploy(
    manifest: Path = typer.Argument(..., help="wadm-style application YAML whose components name their source"),
    registry: str = typer.Option(..., help="OCI registry to push to, e.g. 127.0.0.1:5001"),
    nats_url: str = NATS_URL,
    host_id: Optional[str] = typer.Option(None, help="the wash host to run on (default: the first heard from)"),
    lattice: str = typer.Option("default", help="lattice of the Concordance daemon"),
    provider_id: str = typer.Option("concordance", help="provider id the daemon serves"),
    build_dir: Optional[Path] = typer.Option(None, help="where to build (default: build/ beside the manifest)"),
    insecure: Optional[bool] = typer.Option(None, help="plain-HTTP registry (default: only for loopback)"),
    watch_hosts: bool = typer.Option(False, "--watch", help="stay, and restart the workloads on a live host "
                                                           "whenever their host is gone"),
    log_level: str = typer.Option("info"),
) -> None:
    """Build the components for wasmCloud, push them, start them on a wash host and link them to
    the daemon."""
    configure(log_level, "console")
    try:
        app_manifest = load_manifest(manifest, need_files=False)
    except ManifestError as exc:
        fail(str(exc))
    if insecure is None:
        insecure = registry.split(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]")
    try:
        placements = build_and_push(app_manifest, build_dir or manifest.parent / "build", registry, insecure, lattice)
        run(_deploy(nats_url, host_id, lattice, provider_id, placements, watch_hosts))
    except DeployError as exc:
        fail(str(exc))


async def _deploy(nats_url: str, host_id: str | None, lattice: str, provider_id: str, placements: list,
                  watch_hosts: bool) -> None:
    async with nats_client(nats_url) as nc:
        host = host_id or await find_host(nc, 30)
        await place(nc, host, placements)
        for placement in placements:
            await link(nc, lattice, provider_id, placement)
        typer.echo(f"deployed {len(placements)} component(s) on host {host}")
        if watch_hosts:
            stopping = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
            await watch(nc, host, placements, stopping)
