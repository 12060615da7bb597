"""What every command shares: the app, NATS client connections, and failing with a clear message."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import sys
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Coroutine, NoReturn, TypeVar
from urllib.parse import urlsplit

import nats
import typer

from .. import __version__
from ..config import NatsOptions
from ..daemon import connect
from ..store.jetstream import JetStreamError

T = TypeVar("T")

CLIENT_CONNECT_SECONDS = 10.0  # a server that accepts the connection but does not answer
PROBE_SECONDS = 2.0  # a server that does not even accept it
NATS_URL = typer.Option("nats://127.0.0.1:4222", "--nats-url", envvar="NATS_URL", help="the NATS server")


def _one_paragraph_per_line(text: str | None) -> str | None:
    """Docstrings wrap at the source's line length; help shows each paragraph whole, so the
    terminal wraps it instead of breaking sentences where the source did."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(re.sub(r"\s*\n\s*", " ", p.strip()) for p in paragraphs)


class App(typer.Typer):
    """A Typer app whose commands take their help from their docstrings, one line per paragraph."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            kwargs.setdefault("help", _one_paragraph_per_line(function.__doc__))
            return super(App, self).command(*args, **kwargs)(function)

        return register


app = App(help="Event sourcing for WebAssembly components on NATS JetStream.", no_args_is_help=True)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    """Event sourcing for WebAssembly components on NATS JetStream."""


async def reachable(options: NatsOptions) -> None:
    """Fail at once, with one line, if nothing accepts connections at the server's address: the
    client would otherwise retry a refused connection until its timeout."""
    url = options.url
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_SECONDS)
    except asyncio.TimeoutError:
        fail(f"cannot reach NATS at {options.safe_url}: no answer within {PROBE_SECONDS:.0f}s")
    except ConnectionRefusedError:
        fail(f"cannot reach NATS at {options.safe_url}: connection refused (is `concordance up` running, "
             f"or is another server meant? --nats-url or NATS_URL)")
    except OSError as exc:
        fail(f"cannot reach NATS at {options.safe_url}: {exc.strerror or exc}")
    writer.close()


@asynccontextmanager
async def nats_client(url: str) -> AsyncIterator[nats.aio.client.Client]:
    """A client connection for the commands, closed after use; credentials come from the
    environment (NATS_USER and NATS_PASSWORD, NATS_TOKEN, NATS_CREDS, NATS_CA), never from argv."""
    env = os.environ.get
    options = NatsOptions(url=url, user=env("NATS_USER"), password=env("NATS_PASSWORD"), token=env("NATS_TOKEN"),
                          creds_file=env("NATS_CREDS"), tls_ca=env("NATS_CA"))
    await reachable(options)
    try:
        nc, _ = await asyncio.wait_for(connect(options), CLIENT_CONNECT_SECONDS)
    except (OSError, asyncio.TimeoutError) as exc:
        reason = str(exc) or f"no answer within {CLIENT_CONNECT_SECONDS:.0f}s"
        fail(f"cannot reach NATS at {options.safe_url}: {reason}")
    try:
        yield nc
    finally:
        await nc.close()


def run(work: Coroutine[Any, Any, T]) -> T:
    """Run a client command's coroutine; a NATS error or timeout ends it with one line, not a traceback."""
    try:
        return asyncio.run(work)
    except (nats.errors.Error, JetStreamError) as exc:
        fail(f"NATS: {exc}")
    except (asyncio.TimeoutError, TimeoutError):
        fail("NATS did not answer in time")


_DURATION = re.compile(r"^(\d+)([smhd])$")
_SECONDS_PER = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> float:
    """Seconds in a duration such as 90s, 15m, 12h or 7d; ValueError saying what is expected."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 12h or 7d")
    return float(int(match.group(1)) * _SECONDS_PER[match.group(2)])


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line, ``error: ...``, on stderr and exit with ``code``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)
