"""Derived data, recomputed: `rebuild` (state from the log), `replay` (events to a handler)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer

from ..daemon import load_component
from ..links import Role
from ..logging import configure
from ..maintenance import (
    MaintenanceError,
    ReplayStart,
    aggregate_repository,
    find_spec,
    parse_target,
    rebuild_state,
    reset_handler,
    wait_drained,
)
from ..manifest import ManifestError, load_manifest
from ..runtime.wasmtime_host import ComponentLoadError
from ..signing import Signer, SigningKeyError
from .common import NATS_URL, app, fail, nats_client, run


@app.command()
def rebuild(
    manifest: Path = typer.Argument(..., help="the application manifest (to load the aggregates)"),
    target: Optional[str] = typer.Argument(None, help="AGGREGATE or AGGREGATE.KEY; default: every aggregate"),
    nats_url: str = NATS_URL,
    signing_key_file: Optional[Path] = typer.Option(
        None, envvar="CONCORDANCE_SIGNING_KEY_FILE", help="the daemons' signing key, if they have one"),
) -> None:
    """Recompute CC_STATE from CC_EVENTS: state is derived data."""
    configure("warning", "console")
    try:
        signer = Signer.from_file(signing_key_file) if signing_key_file else None
        app_manifest = load_manifest(manifest)
        targets = parse_target(target, app_manifest)
        count = run(_rebuild(nats_url, targets, signer))
    except (ManifestError, MaintenanceError, ComponentLoadError, SigningKeyError) as exc:
        fail(str(exc))
    typer.echo(f"rebuilt the state of {count} instance(s)")


async def _rebuild(url: str, targets: list, signer: Signer | None) -> int:  # type: ignore[type-arg]
    async with nats_client(url) as nc:
        count = 0
        for spec, key in targets:
            component = await load_component(spec)
            try:
                repository = aggregate_repository(nc, spec.interest, component, signer)
                count += await rebuild_state(repository, key, lambda k: typer.echo(f"{spec.interest.name}.{k}"))
            finally:
                await component.close()
        return count


@app.command()
def replay(
    manifest: Path = typer.Argument(..., help="the application manifest"),
    handler: str = typer.Argument(..., help="NAME of a projector or notifier"),
    from_seq: Optional[int] = typer.Option(None, "--from-seq", help="replay from this CC_EVENTS sequence"),
    since: Optional[datetime] = typer.Option(None, help="replay events stored since this time (ISO 8601)"),
    yes: bool = typer.Option(False, "--yes", help="do not ask before re-running a notifier's side effects"),
    wait: bool = typer.Option(True, help="follow the replay with a progress bar"),
    nats_url: str = NATS_URL,
) -> None:
    """Feed a projector (or notifier) its events again, from the start or from a sequence or time.

    From the start, the handler's read model is emptied first. A running daemon does the work.
    """
    configure("warning", "console")
    try:
        spec = find_spec(load_manifest(manifest), handler, {Role.PROJECTOR, Role.NOTIFIER})
    except (ManifestError, MaintenanceError) as exc:
        fail(str(exc))
    if spec.interest.role is Role.NOTIFIER and not yes:
        typer.confirm(f"{handler} is a notifier: replaying repeats its side effects. Go on?", abort=True)
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    try:
        run(_replay(nats_url, spec.interest, ReplayStart(from_seq, since), wait))
    except MaintenanceError as exc:
        fail(str(exc))


async def _replay(url: str, interest, start: ReplayStart, wait: bool) -> None:  # type: ignore[no-untyped-def]
    async with nats_client(url) as nc:
        total = await reset_handler(nc, interest, start)
        typer.echo(f"{interest.consumer_name}: {total} event(s) to replay")
        if wait and total:
            with typer.progressbar(length=total, label="replaying") as bar:
                await wait_drained(nc, interest, total, bar.update, stall_seconds=30)


