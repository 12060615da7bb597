"""The ``concordance`` command."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import nats
import structlog
import typer

from . import __version__
from .build import BuildError, build_component
from .config import NatsOptions
from .daemon import Daemon, DaemonFailed, connect, load_component
from .links import Role
from .logging import configure
from .maintenance import (
    MaintenanceError,
    ReplayStart,
    aggregate_worker,
    find_spec,
    parse_target,
    rebuild_state,
    reset_handler,
    wait_drained,
)
from .manifest import ManifestError, load_manifest
from .naming import (
    COMMANDS_STREAM,
    DEADLETTER_PREFIX,
    DEADLETTER_STREAM,
    RESULTS_BUCKET,
    RETRY_FOR,
    command_subject,
    retry_subject,
)
from .nats_server import EmbeddedNatsServer, NatsServerError
from .runtime.wasmtime_host import ComponentLoadError
from .status import STATUS_SUBJECT
from .store.deadletters import DeadLetters
from .store.jetstream import publish
from .store.streams import IncompatibleStream

CLIENT_CONNECT_SECONDS = 10.0
NATS_URL = typer.Option("nats://127.0.0.1:4222", "--nats-url", envvar="NATS_URL")


async def _client(url: str) -> nats.aio.client.Client:
    """A client connection for the commands below; credentials come from the environment
    (NATS_USER and NATS_PASSWORD, NATS_TOKEN, NATS_CREDS, NATS_CA), never from the command line."""
    env = os.environ.get
    options = NatsOptions(url=url, user=env("NATS_USER"), password=env("NATS_PASSWORD"), token=env("NATS_TOKEN"),
                          creds_file=env("NATS_CREDS"), tls_ca=env("NATS_CA"))
    try:
        nc, _ = await asyncio.wait_for(connect(options), CLIENT_CONNECT_SECONDS)
    except (OSError, asyncio.TimeoutError) as exc:
        _fail(f"cannot reach NATS at {url}: {exc or 'no answer'}")
    return nc


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
        asyncio.run(_serve(Daemon(app_manifest, options, health_port=health_port), server))
    except (ComponentLoadError, IncompatibleStream, DaemonFailed) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot reach NATS at {nats_url}: {exc}")
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
        _fail(str(exc))
    typer.echo(f"{output}: {'built' if built else 'up to date'}")


@app.command()
def send(
    aggregate: str = typer.Argument(..., help="aggregate name, e.g. bankaccount"),
    command: str = typer.Argument(..., help="RawCommand JSON, or @file.json"),
    nats_url: str = NATS_URL,
    wait: float = typer.Option(10.0, help="seconds to wait for the outcome (0: don't wait)"),
) -> None:
    """Send a command and print its outcome from CC_RESULTS."""
    body = Path(command[1:]).read_bytes() if command.startswith("@") else command.encode()
    result = asyncio.run(_send(nats_url, aggregate, body, wait))
    typer.echo(json.dumps(result))
    if result.get("status") == "rejected":
        raise typer.Exit(1)


async def _send(url: str, aggregate: str, body: bytes, wait: float) -> dict:
    nc = await _client(url)
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


@app.command()
def rebuild(
    manifest: Path = typer.Argument(..., help="the application manifest (to load the aggregates)"),
    target: Optional[str] = typer.Argument(None, help="AGGREGATE or AGGREGATE.KEY; default: every aggregate"),
    nats_url: str = NATS_URL,
) -> None:
    """Recompute CC_STATE from CC_EVENTS: state is derived data."""
    configure("warning", "console")
    try:
        app_manifest = load_manifest(manifest)
        targets = parse_target(target, app_manifest)
        count = asyncio.run(_rebuild(nats_url, targets))
    except (ManifestError, MaintenanceError, ComponentLoadError) as exc:
        _fail(str(exc))
    typer.echo(f"rebuilt the state of {count} instance(s)")


async def _rebuild(url: str, targets: list) -> int:  # type: ignore[type-arg]
    nc = await _client(url)
    try:
        count = 0
        for spec, key in targets:
            component = await load_component(spec)
            try:
                worker = aggregate_worker(nc, spec.interest, component)
                count += await rebuild_state(nc, worker, key, lambda k: typer.echo(f"{spec.interest.name}.{k}"))
            finally:
                await component.close()
        return count
    finally:
        await nc.close()


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
        _fail(str(exc))
    if spec.interest.role is Role.NOTIFIER and not yes:
        typer.confirm(f"{handler} is a notifier: replaying repeats its side effects. Go on?", abort=True)
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    try:
        asyncio.run(_replay(nats_url, spec.interest, ReplayStart(from_seq, since), wait))
    except MaintenanceError as exc:
        _fail(str(exc))


async def _replay(url: str, interest, start: ReplayStart, wait: bool) -> None:  # type: ignore[no-untyped-def]
    nc = await _client(url)
    try:
        total = await reset_handler(nc, interest, start)
        typer.echo(f"{interest.consumer_name}: {total} event(s) to replay")
        if wait and total:
            with typer.progressbar(length=total, label="replaying") as bar:
                await wait_drained(nc, interest, total, bar.update, stall_seconds=30)
    finally:
        await nc.close()


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="every daemon's full report, as JSON"),
    wait: float = typer.Option(1.0, help="seconds to collect answers"),
    nats_url: str = NATS_URL,
) -> None:
    """Ask every daemon that shares this NATS server how it is doing."""
    reports = asyncio.run(_status(nats_url, wait))
    if as_json:
        typer.echo(json.dumps(reports, indent=2))
        return
    if not reports:
        _fail(f"no daemon answered on {STATUS_SUBJECT} within {wait}s")
    for report in reports:
        typer.echo(_status_text(report))


async def _status(url: str, wait: float) -> list[dict]:
    nc = await _client(url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(STATUS_SUBJECT, b"", reply=inbox)
        reports = []
        try:
            async with asyncio.timeout(wait):
                async for msg in sub.messages:
                    reports.append(json.loads(msg.data))
        except TimeoutError:
            pass
        return sorted(reports, key=lambda r: str(r.get("daemon")))
    finally:
        await nc.close()


def _status_text(report: dict) -> str:
    health = report.get("health", {})
    lines = [f"daemon {report.get('daemon')} ({report.get('application')}) "
             f"{'healthy' if health.get('healthy') else 'UNHEALTHY: ' + str(health.get('message'))}"]
    for component in report.get("components", []):
        latency = component.get("latency") or {}
        lines.append(f"  component {component['name']}: {component['interest']['role']} {component['interest']['name']}"
                     f", {component['calls']} calls, {component['failures']} failed"
                     f", p50 {latency.get('p50_ms', '-')} ms, p99 {latency.get('p99_ms', '-')} ms")
        lines.extend(f"    error {e['time']}: {e['error']}" for e in component.get("recent_errors", [])[-3:])
    for consumer in report.get("consumers", []):
        lines.append(f"  consumer {consumer['name']}: pending {consumer.get('pending', '?')}, ack pending "
                     f"{consumer.get('ack_pending', '?')}, redelivered {consumer.get('redelivered', '?')}, "
                     f"dead letters {consumer['dead_letters']}")
    return "\n".join(lines)


deadletters = typer.Typer(help="List, show, retry and purge dead letters (stream CC_DEADLETTER).",
                          no_args_is_help=True)
app.add_typer(deadletters, name="deadletters")


async def _with_store(url: str, work):  # type: ignore[no-untyped-def]
    nc = await _client(url)
    try:
        return await work(nc, DeadLetters(nc))
    finally:
        await nc.close()


@deadletters.command("list")
def deadletters_list(consumer: Optional[str] = typer.Option(None, help="only this consumer's"),
                     nats_url: str = NATS_URL) -> None:
    """One line per dead letter: sequence, consumer, original subject, deliveries, reason."""
    letters = asyncio.run(_with_store(nats_url, lambda nc, store: store.list(consumer)))
    for letter in letters:
        typer.echo(f"{letter.seq}\t{letter.consumer}\t{letter.subject}\t{letter.deliveries}\t{letter.reason}")
    typer.echo(f"{len(letters)} dead letter(s)", err=True)


@deadletters.command("show")
def deadletters_show(seq: int, nats_url: str = NATS_URL) -> None:
    """The whole dead letter as JSON, with its body decoded when it is text."""
    letter = asyncio.run(_with_store(nats_url, lambda nc, store: store.get(seq)))
    if letter is None:
        _fail(f"no dead letter {seq}")
    shown = letter.model_dump()
    try:
        shown["body"] = letter.body.decode()
    except UnicodeDecodeError:
        pass
    typer.echo(json.dumps(shown, indent=2))


@deadletters.command("retry")
def deadletters_retry(seq: int, nats_url: str = NATS_URL) -> None:
    """Send a dead message again, exactly once, and remove the dead letter.

    A command goes back to its subject. An event goes back to its subject with the suffix
    `.retry`, for the one consumer that failed it: other handlers skip it, aggregates never fold it.
    """
    async def work(nc, store):  # type: ignore[no-untyped-def]
        letter = await store.get(seq)
        if letter is None:
            raise RetryRefused(f"no dead letter {seq}")
        if letter.consumer.startswith("AGG_EVT_"):
            raise RetryRefused(f"dead letter {seq} is aggregate state catch-up: run concordance rebuild instead")
        headers = {"Nats-Msg-Id": f"retry:{seq}"}
        subject = letter.subject
        if letter.stream != COMMANDS_STREAM:
            subject = retry_subject(letter.subject) if not letter.subject.endswith(".retry") else letter.subject
            kept = {k: v for k, v in letter.headers.items() if not k.startswith("Nats-")}
            headers = {**kept, **headers, RETRY_FOR: letter.consumer}
        new_seq = await publish(nc, subject, letter.body, headers)
        await store.remove(nc.jetstream(), seq)
        return subject, new_seq

    try:
        subject, new_seq = asyncio.run(_with_store(nats_url, work))
    except RetryRefused as exc:
        _fail(str(exc))
    typer.echo(f"dead letter {seq} sent again on {subject} as {new_seq}")


@deadletters.command("purge")
def deadletters_purge(consumer: Optional[str] = typer.Option(None, help="only this consumer's"),
                      yes: bool = typer.Option(False, "--yes", help="do not ask"),
                      nats_url: str = NATS_URL) -> None:
    """Delete dead letters for good."""
    if not yes:
        typer.confirm(f"Delete the dead letters of {consumer or 'every consumer'}?", abort=True)
    subject = f"{DEADLETTER_PREFIX}.{consumer}" if consumer else None

    async def work(nc, store):  # type: ignore[no-untyped-def]
        return await nc.jetstream().purge_stream(DEADLETTER_STREAM, subject=subject)

    asyncio.run(_with_store(nats_url, work))
    typer.echo("purged")


class RetryRefused(Exception):
    pass


def _fail(message: str) -> None:
    log.error(message)
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
