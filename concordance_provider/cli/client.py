"""Talking to running daemons from any machine that reaches NATS: `send`, `status`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer

from ..naming import RESULTS_BUCKET, command_subject
from ..status import STATUS_SUBJECT
from .common import NATS_URL, app, fail, nats_client


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
    async with nats_client(url) as nc:
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
        fail(f"no daemon answered on {STATUS_SUBJECT} within {wait}s")
    for report in reports:
        typer.echo(_status_text(report))


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
             f"{'healthy' if health.get('healthy') else 'UNHEALTHY: ' + str(health.get('message'))}"]
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


