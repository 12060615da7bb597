"""Talking to running daemons from any machine that reaches NATS: `send`, `status`."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import typer
from nats.errors import NoRespondersError

from ..naming import InvalidName, check_token, command_subject
from ..deployed import DEPLOYED_BUCKET, deployed, live_states
from ..status import STATUS_SUBJECT
from ..store.results import read_result
from ..wire import BadMessage, parse_command
from .common import NATS_URL, app, fail, nats_client, run


@app.command()
def send(
    aggregate: str = typer.Argument(..., help="aggregate name, e.g. bankaccount"),
    command: str = typer.Argument(..., help="RawCommand JSON text; @FILE to send a file's contents; - for stdin"),
    nats_url: str = NATS_URL,
    wait: float = typer.Option(10.0, help="seconds to wait for the outcome (0: don't wait)"),
) -> None:
    """Send a command on cc.commands.AGGREGATE.KEY and print its outcome from CC_RESULTS.

    The command is checked here before it is sent, by the rules the daemon applies: JSON, with
    command_type, key and data; its key goes in the subject too. A file is sent only when named with @ (a bare path is taken for
    JSON text and refused). Exit status: 0 accepted (or sent, with --wait 0), 1 rejected, 2 not
    sent, 3 no outcome within --wait seconds.
    """
    try:
        check_token(aggregate, "aggregate")
    except InvalidName as exc:
        fail(str(exc))
    body = _command_body(command)
    try:
        key = parse_command(body).key
    except BadMessage as exc:
        fail(f"not sent: {exc}")
    result = run(_send(nats_url, aggregate, key, body, wait))
    typer.echo(json.dumps(result))
    if result.get("status") == "rejected":
        raise typer.Exit(1)
    if result.get("status") == "pending":
        raise typer.Exit(3)


def _command_body(command: str) -> bytes:
    """The command's bytes, from the text itself, a file (@FILE) or stdin (-), checked to be JSON."""
    if command == "-":
        body, source = sys.stdin.buffer.read(), "the command read from stdin"
    elif command.startswith("@"):
        path = Path(command[1:])
        try:
            body, source = path.read_bytes(), str(path)
        except FileNotFoundError:
            fail(f"no such file: {path}")
        except OSError as exc:
            fail(f"cannot read {path}: {exc.strerror or exc}")
    else:
        body, source = command.encode(), "the command"
    try:
        json.loads(body)
    except ValueError as exc:
        if source == "the command" and Path(command).is_file():
            fail(f"{command} is a file, and a command is given as JSON text: write @{command} to send the file")
        fail(f"{source} is not JSON ({exc}); give RawCommand JSON, or @FILE to send a file")
    return body


async def _send(url: str, aggregate: str, key: str, body: bytes, wait: float) -> dict:
    """Publish on the key's own subject, so a client allowed only its keys can send; then read the
    outcome where that key's outcomes are (``{aggregate}.{key}.{seq}``)."""
    subject = command_subject(aggregate, key)
    async with nats_client(url) as nc:
        try:
            reply = await nc.request(subject, body, timeout=5)
        except NoRespondersError:
            fail(f"nothing stores {subject}: has a daemon of this version run against this server?")
        ack = json.loads(reply.data)
        if "error" in ack or wait <= 0:
            return ack
        outcome = await read_result(nc, int(ack["seq"]), aggregate=aggregate, key=key, wait=wait)
        if outcome is None:
            return {"seq": ack["seq"], "status": "pending", "error": f"no outcome within {wait}s"}
        return {"seq": ack["seq"], **json.loads(outcome)}


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="every daemon's full report, as JSON"),
    wait: float = typer.Option(1.0, help="seconds to collect answers"),
    nats_url: str = NATS_URL,
) -> None:
    """Ask every daemon that shares this NATS server how it is doing, and list the workloads
    `concordance deploy` placed on wasmCloud hosts, each with its state as its host tells it.

    With --json, a component that runs as a deployed workload carries it under "workload"."""
    reports = run(_status(nats_url, wait))
    workloads = run(_deployed(nats_url))
    if as_json:
        typer.echo(json.dumps(_with_workloads(reports, workloads), indent=2))
        return
    for report in reports:
        typer.echo(_status_text(report))
    if workloads:
        typer.echo(f"workloads on wasmCloud hosts ({DEPLOYED_BUCKET})")
        typer.echo("\n".join(_workload_text(workload) for workload in workloads))
    if not reports:
        fail(f"no daemon answered on {STATUS_SUBJECT} within {wait}s")


async def _deployed(url: str) -> list[dict]:
    async with nats_client(url) as nc:
        workloads = await deployed(nc.jetstream())
        states = await live_states(nc, workloads)
        return [{**w.model_dump(), "state": state} for w, state in zip(workloads, states)]


def _with_workloads(reports: list[dict], workloads: list[dict]) -> list[dict]:
    by_subject = {f"nats:{w['dispatch_subject']}": w for w in workloads}
    for component in (c for report in reports for c in report.get("components", [])):
        if component.get("runs") in by_subject:
            component["workload"] = by_subject[component["runs"]]
    return reports


def _workload_text(workload: dict) -> str:
    return (f"  workload {workload['workload_id']} ({workload['application']} {workload['component']}): "
            f"{workload['state']} on host {workload['host_id']}, image {workload['image']}, "
            f"answers on {workload['dispatch_subject']}")


async def _status(url: str, wait: float) -> list[dict]:
    async with nats_client(url) as nc:
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


def _status_text(report: dict) -> str:
    health = report.get("health", {})
    lines = [f"daemon {report.get('daemon')} ({report.get('application')}) "
             f"{'healthy' if health.get('healthy') else 'UNHEALTHY: ' + str(health.get('message'))}"
             f"{' (' + health['message'] + ')' if health.get('healthy') and health.get('message') else ''}"]
    for component in report.get("components", []):
        latency = component.get("latency") or {}
        lines.append(f"  component {component['name']}: {component['interest']['role']} {component['interest']['name']}"
                     f", {component['calls']} calls, {component['failures']} failed"
                     f", p50 {latency.get('p50_ms', '-')} ms, p99 {latency.get('p99_ms', '-')} ms"
                     f", runs {component.get('runs', '?')}")
        lines.extend(f"    error {e['time']}: {e['error']}" for e in component.get("recent_errors", [])[-3:])
    for consumer in report.get("consumers", []):
        lines.append(f"  consumer {consumer['name']}: pending {consumer.get('pending', '?')}, ack pending "
                     f"{consumer.get('ack_pending', '?')}, redelivered {consumer.get('redelivered', '?')}, "
                     f"dead letters {consumer['dead_letters']}{', STUCK' if consumer.get('stuck') else ''}")
    return "\n".join(lines)


