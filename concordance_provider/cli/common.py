"""What every command shares: the app, NATS client connections, and failing with a clear message."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import re
import sys
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Coroutine, NoReturn, Optional, TypeVar
from urllib.parse import urlsplit

import nats
import typer

from .. import __version__
from ..config import NatsOptions, SecretError, one_secret, redact
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


# How every client command logs in to NATS, as `up` does; secrets come from files or the
# environment (NATS_PASSWORD, NATS_TOKEN), never from the command line.
CONNECTION_OPTIONS: dict[str, tuple[Any, Any]] = {
    "user": (Optional[str], typer.Option(None, "--user", envvar="NATS_USER", help="NATS user")),
    "password_file": (Optional[Path], typer.Option(None, "--password-file", envvar="NATS_PASSWORD_FILE",
                                                   help="file holding the NATS password (or NATS_PASSWORD)")),
    "token_file": (Optional[Path], typer.Option(None, "--token-file", envvar="NATS_TOKEN_FILE",
                                                help="file holding the NATS token (or NATS_TOKEN)")),
    "creds": (Optional[Path], typer.Option(None, "--creds", envvar="NATS_CREDS",
                                           help="NATS credentials file (JWT + nkey seed)")),
    "tls_ca": (Optional[Path], typer.Option(None, "--tls-ca", envvar="NATS_CA",
                                            help="CA certificate to verify the NATS server")),
    "inbox_prefix": (Optional[str], typer.Option(None, "--inbox-prefix", envvar="NATS_INBOX_PREFIX",
                                                 help="this user's inboxes, e.g. _INBOX_alice (see `nats-config`)")),
}
_connection: ContextVar[dict[str, Any]] = ContextVar("connection", default={})


def _with_connection_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """A command that talks to NATS (it takes ``nats_url``) also takes the connection options;
    they are kept for ``nats_client`` while the command runs, so each command need not pass them on.
    A command that declares them itself (``up``) is left as it is."""
    signature = inspect.signature(function)
    if "nats_url" not in signature.parameters or CONNECTION_OPTIONS.keys() & signature.parameters.keys():
        return function

    @functools.wraps(function)
    def command(*args: Any, **kwargs: Any) -> Any:
        _connection.set({name: kwargs.pop(name, None) for name in CONNECTION_OPTIONS})
        return function(*args, **kwargs)

    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
             for name, (kind, option) in CONNECTION_OPTIONS.items()]
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *extra])
    return command


class App(typer.Typer):
    """A Typer app whose commands take their help from their docstrings, one line per paragraph,
    and the connection options when they talk to NATS."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            kwargs.setdefault("help", _one_paragraph_per_line(function.__doc__))
            return super(App, self).command(*args, **kwargs)(_with_connection_options(function))

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


def client_options(url: str) -> NatsOptions:
    """The running command's connection: its options, else the environment (NATS_USER,
    NATS_PASSWORD or NATS_PASSWORD_FILE, NATS_TOKEN or NATS_TOKEN_FILE, NATS_CREDS, NATS_CA,
    NATS_INBOX_PREFIX)."""
    given, env = _connection.get(), os.environ.get
    path = lambda name, var: given.get(name) or (Path(env(var)) if env(var) else None)  # noqa: E731
    password_file, token_file = path("password_file", "NATS_PASSWORD_FILE"), path("token_file", "NATS_TOKEN_FILE")
    try:
        password = one_secret(env("NATS_PASSWORD"), password_file, "password")
        token = one_secret(env("NATS_TOKEN"), token_file, "token")
    except SecretError as exc:
        fail(str(exc))
    return NatsOptions(url=url, user=given.get("user") or env("NATS_USER"), password=password, token=token,
                       creds_file=path("creds", "NATS_CREDS"), tls_ca=path("tls_ca", "NATS_CA"),
                       inbox_prefix=given.get("inbox_prefix") or env("NATS_INBOX_PREFIX"))


_refused: list[str] = []  # what the server refused this command: a request then only times out


def _refusal_noter(work: asyncio.Task[Any] | None) -> Callable[[Exception], Coroutine[Any, Any, None]]:
    """An error callback that notes a permission the server refused and ends ``work`` at once: the
    command fails saying so (``run``) instead of waiting for a reply that will not come."""
    async def note(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            _refused.append(str(exc).removeprefix("nats: "))
            if work is not None and not work.done():
                work.cancel()
    return note


@asynccontextmanager
async def nats_client(url: str) -> AsyncIterator[nats.aio.client.Client]:
    """A client connection for the commands, closed after use; see ``client_options``."""
    options = client_options(url)
    await reachable(options)
    note_refusal = _refusal_noter(asyncio.current_task())
    try:
        nc, _ = await asyncio.wait_for(connect(options, error_cb=note_refusal), CLIENT_CONNECT_SECONDS)
    except (OSError, asyncio.TimeoutError) as exc:
        reason = redact(str(exc)) or f"no answer within {CLIENT_CONNECT_SECONDS:.0f}s"
        fail(f"cannot reach NATS at {options.safe_url}: {reason}")
    try:
        yield nc
    finally:
        await nc.close()


def run(work: Coroutine[Any, Any, T]) -> T:
    """Run a client command's coroutine; a NATS error or timeout ends it with one line, not a
    traceback. A permission NATS refused is named, even if the work went on without it (a
    refused publish is only dropped), since what it found is then incomplete."""
    try:
        done = asyncio.run(work)
    except asyncio.CancelledError:  # ended by a refusal (``nats_client``)
        _fail_if_refused()
        raise
    except (nats.errors.Error, JetStreamError, asyncio.TimeoutError, TimeoutError) as exc:
        _fail_if_refused()
        if isinstance(exc, (nats.errors.Error, JetStreamError)) and not isinstance(exc, nats.errors.TimeoutError):
            fail(f"NATS: {redact(str(exc))}")
        fail("NATS did not answer in time")
    _fail_if_refused()
    return done


def _fail_if_refused() -> None:
    if _refused:
        fail(f"NATS refused this user: {_refused[0]} (subjects in lower case, as nats-py reports them); "
             f"see `concordance nats-config` for what each user may do")


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
