"""What every command shares: the app, NATS client connections, and failing with a clear message."""

from __future__ import annotations

import asyncio
import os
import sys
from contextlib import asynccontextmanager
from typing import AsyncIterator, NoReturn

import nats
import structlog
import typer

from ..config import NatsOptions
from ..daemon import connect

CLIENT_CONNECT_SECONDS = 10.0
NATS_URL = typer.Option("nats://127.0.0.1:4222", "--nats-url", envvar="NATS_URL")

app = typer.Typer(help="Event sourcing for WebAssembly components on NATS JetStream.", no_args_is_help=True)
log = structlog.get_logger("concordance")


@asynccontextmanager
async def nats_client(url: str) -> AsyncIterator[nats.aio.client.Client]:
    """A client connection for the commands, closed after use; credentials come from the
    environment (NATS_USER and NATS_PASSWORD, NATS_TOKEN, NATS_CREDS, NATS_CA), never from argv."""
    env = os.environ.get
    options = NatsOptions(url=url, user=env("NATS_USER"), password=env("NATS_PASSWORD"), token=env("NATS_TOKEN"),
                          creds_file=env("NATS_CREDS"), tls_ca=env("NATS_CA"))
    try:
        nc, _ = await asyncio.wait_for(connect(options), CLIENT_CONNECT_SECONDS)
    except (OSError, asyncio.TimeoutError) as exc:
        fail(f"cannot reach NATS at {url}: {str(exc) or f'no answer within {CLIENT_CONNECT_SECONDS:.0f}s'}")
    try:
        yield nc
    finally:
        await nc.close()



def fail(message: str) -> NoReturn:
    log.error(message)
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)

