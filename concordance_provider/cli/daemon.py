"""Running the daemon and building components: `up`, `build`, `version`."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Optional

import typer

from .. import __version__
from ..build import BuildError, build_component
from ..config import NatsOptions
from ..daemon import Daemon, DaemonFailed
from ..logging import configure
from ..manifest import ManifestError, load_manifest
from ..nats_server import EmbeddedNatsServer, NatsServerError
from ..runtime.wasmtime_host import ComponentLoadError
from ..store.streams import IncompatibleStream
from .common import app, fail


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command()
def up(
    manifest: Path = typer.Argument(..., help="wadm-style application YAML"),
    nats_url: Optional[str] = typer.Option(None, help="use this NATS server instead of starting one"),
    user: Optional[str] = typer.Option(None, envvar="NATS_USER"),
    password: Optional[str] = typer.Option(None, envvar="NATS_PASSWORD"),
    token: Optional[str] = typer.Option(None, envvar="NATS_TOKEN"),
    creds: Optional[Path] = typer.Option(None, envvar="NATS_CREDS", help="NATS credentials file (JWT + nkey seed)"),
    tls_ca: Optional[Path] = typer.Option(None, envvar="NATS_CA", help="CA certificate to verify the NATS server"),
    js_domain: Optional[str] = typer.Option(None, help="JetStream domain"),
    state_dir: Path = typer.Option(Path(".concordance"), envvar="CONCORDANCE_STATE_DIR",
                                   help="where the embedded NATS server keeps its data"),
    port: int = typer.Option(4222, help="port of the embedded NATS server (loopback only)"),
    health_port: Optional[int] = typer.Option(None, help="serve GET /health on this loopback port"),
    log_level: str = typer.Option("info"),
    log_format: str = typer.Option("auto", help="auto, json or console"),
) -> None:
    """Run the daemon in the foreground until Ctrl-C or SIGTERM."""
    configure(log_level, log_format)
    try:
        app_manifest = load_manifest(manifest)
    except ManifestError as exc:
        fail(str(exc))
    server = None
    if nats_url is None:
        server = EmbeddedNatsServer(state_dir.resolve(), port)
        try:
            server.start()
        except NatsServerError as exc:
            fail(str(exc))
        nats_url = server.url
    options = NatsOptions(url=nats_url, user=user, password=password, token=token,
                          creds_file=creds, tls_ca=tls_ca, js_domain=js_domain)
    try:
        asyncio.run(_serve(Daemon(app_manifest, options, health_port=health_port), server))
    except (ComponentLoadError, IncompatibleStream, DaemonFailed) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot reach NATS at {nats_url}: {exc}")
    finally:
        if server is not None:
            server.stop()


async def _serve(daemon: Daemon, server: EmbeddedNatsServer | None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.stopping.set)
    supervisor = asyncio.create_task(server.supervise(daemon.stopping)) if server else None
    try:
        await daemon.run()
    finally:
        if supervisor is not None:
            supervisor.cancel()


@app.command()
def build(
    source_dir: Path = typer.Argument(..., help="folder holding the component's app.py"),
    world: str = typer.Option(..., help="aggregate, process-manager or stateless-handler"),
    output: Path = typer.Option(..., "-o", "--output", help="the .wasm file to write"),
    module: str = typer.Option("app", help="the Python module that defines WitWorld"),
) -> None:
    """Build a Python component against interface/ with componentize-py."""
    try:
        built = build_component(source_dir, world, output, module)
    except BuildError as exc:
        fail(str(exc))
    typer.echo(f"{output}: {'built' if built else 'up to date'}")


