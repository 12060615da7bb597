"""Is the daemon able to do its work? Answered truthfully, and even while NATS is away.

Unhealthy while the NATS connection is down, JetStream has not answered its latest probe, a
stream or bucket the daemon cannot create again is missing (``stream_watch``), or a consumer has
spent longer on one batch than `--stuck-after` allows (stuck). A healthy daemon's message says
what an operator should still know (events removed from the log).
Served on loopback HTTP (``--health-port``): ``GET /health`` gives 200 or 503 with a JSON body;
``GET /metrics`` the Prometheus metrics (``metrics.py``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import structlog
from nats.aio.client import Client as NATS

from .stream_watch import StreamWatch

log = structlog.get_logger(__name__)

PROBE_SECONDS = 5.0


@dataclass
class Health:
    nc: NATS | None = None
    jetstream_ok: bool = False
    last_error: str | None = None
    since: float = field(default_factory=time.monotonic)
    stuck: Callable[[], list[str]] = lambda: []  # names of consumers that stopped making progress
    watch: StreamWatch | None = None  # the streams and buckets, looked at on every probe

    def report(self) -> dict[str, object]:
        connected = self.nc is not None and self.nc.is_connected
        stuck = self.stuck() if connected and self.jetstream_ok else []
        lost = self.watch.problems if self.watch is not None else []
        healthy = False
        if not connected:
            message = "not connected to NATS"
        elif not self.jetstream_ok:
            message = f"JetStream not answering: {self.last_error}"
        elif lost:
            message = "; ".join(lost)
        elif stuck:
            message = f"consumer(s) stuck: {', '.join(stuck)}"
        else:
            healthy = True
            message = "; ".join(self.watch.notes) if self.watch is not None and self.watch.notes else None
        return {"healthy": healthy, "message": message}

    async def probe(self, stopping: asyncio.Event) -> None:
        """Ask JetStream for the account info every few seconds; remember whether it answered."""
        while not stopping.is_set():
            was = self.report()["healthy"]
            try:
                assert self.nc is not None
                await self.nc.jetstream().account_info()
                if self.watch is not None:
                    await self.watch.check()
                self.jetstream_ok, self.last_error = True, None
            except Exception as exc:  # noqa: BLE001 - any failure means not healthy
                self.jetstream_ok, self.last_error = False, str(exc) or type(exc).__name__
            now = self.report()
            if now["healthy"] != was:
                (log.info if now["healthy"] else log.warning)("health changed", **now)
            try:
                await asyncio.wait_for(stopping.wait(), PROBE_SECONDS)
            except asyncio.TimeoutError:
                pass


async def serve(health: Health, port: int,
                metrics: Callable[[], Awaitable[tuple[str, bytes]]] | None = None) -> asyncio.Server:
    """A minimal loopback HTTP endpoint: ``/health``, and ``/metrics`` when ``metrics`` gives
    (content type, body)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            path = request.split(b" ")[1].split(b"?")[0] if request.count(b" ") >= 2 else b""
            content_type = "application/json"
            if path == b"/health":
                report = health.report()
                status = "200 OK" if report["healthy"] else "503 Service Unavailable"
                body = json.dumps(report).encode()
            elif path == b"/metrics" and metrics is not None:
                status = "200 OK"
                content_type, body = await metrics()
            else:
                status, body = "404 Not Found", b'{"error": "try /health or /metrics"}'
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port)
    log.info("health endpoint", url=f"http://127.0.0.1:{port}/health", metrics=f"http://127.0.0.1:{port}/metrics")
    return server
