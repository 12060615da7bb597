"""The ``concordance`` command."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Optional

import nats
import structlog
import typer

from . import __version__
from .build import BuildError, build_component
from .config import NatsOptions
from .daemon import Daemon
from .logging import configure
from .manifest import ManifestError, load_manifest
from .naming import RESULTS_BUCKET, command_subject
from .nats_server import EmbeddedNatsServer, NatsServerError
from .runtime.wasmtime_host import ComponentLoadError
from .store.streams import IncompatibleStream

app = typer.Typer(help="Event sourcing for WebAssembly components on NATS JetStream.", no_args_is_help=True)
log = structlog.get_logger("concordance")


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
    creds: Optional[Path] = typer.Option(None, help="NATS credentials file (JWT + nkey seed)"),
    tls_ca: Optional[Path] = typer.Option(None, help="CA certificate to verify the NATS server"),
    js_domain: Optional[str] = typer.Option(None, help="JetStream domain"),
    state_dir: Path = typer.Option(Path(".concordance"), envvar="CONCORDANCE_STATE_DIR",
                                   help="where the embedded NATS server keeps its data"),
    port: int = typer.Option(4222, help="port of the embedded NATS server (loopback only)"),
    log_level: str = typer.Option("info"),
    log_format: str = typer.Option("auto", help="auto, json or console"),
) -> None:
    """Run the daemon in the foreground until Ctrl-C or SIGTERM."""
    configure(log_level, log_format)
    try:
        app_manifest = load_manifest(manifest)
    except ManifestError as exc:
        _fail(str(exc))
    server = None
    if nats_url is None:
        server = EmbeddedNatsServer(state_dir.resolve(), port)
        try:
            server.start()
        except NatsServerError as exc:
            _fail(str(exc))
        nats_url = server.url
    options = NatsOptions(url=nats_url, user=user, password=password, token=token,
                          creds_file=creds, tls_ca=tls_ca, js_domain=js_domain)
    try:
        asyncio.run(_serve(Daemon(app_manifest, options)))
    except (ComponentLoadError, IncompatibleStream) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot reach NATS at {nats_url}: {exc}")
    finally:
        if server is not None:
            server.stop()


async def _serve(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.stopping.set)
    await daemon.run()


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
        _fail(str(exc))
    typer.echo(f"{output}: {'built' if built else 'up to date'}")


@app.command()
def send(
    aggregate: str = typer.Argument(..., help="aggregate name, e.g. bankaccount"),
    command: str = typer.Argument(..., help="RawCommand JSON, or @file.json"),
    nats_url: str = typer.Option("nats://127.0.0.1:4222"),
    wait: float = typer.Option(10.0, help="seconds to wait for the outcome (0: don't wait)"),
) -> None:
    """Send a command and print its outcome from CC_RESULTS."""
    body = Path(command[1:]).read_bytes() if command.startswith("@") else command.encode()
    result = asyncio.run(_send(nats_url, aggregate, body, wait))
    typer.echo(json.dumps(result))
    if result.get("status") == "rejected":
        raise typer.Exit(1)


async def _send(url: str, aggregate: str, body: bytes, wait: float) -> dict:
    nc = await nats.connect(url)
    try:
        reply = await nc.request(command_subject(aggregate), body, timeout=5)
        ack = json.loads(reply.data)
        if "error" in ack or wait <= 0:
            return ack
        kv = await nc.jetstream().key_value(RESULTS_BUCKET)
        watcher = await kv.watch(str(ack["seq"]))
        try:
            async with asyncio.timeout(wait):
                async for entry in watcher:
                    if entry is not None and entry.value:
                        return {"seq": ack["seq"], **json.loads(entry.value)}
        except TimeoutError:
            return {"seq": ack["seq"], "status": "pending", "error": f"no outcome within {wait}s"}
        finally:
            await watcher.stop()
        return ack
    finally:
        await nc.close()


def _fail(message: str) -> None:
    log.error(message)
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
