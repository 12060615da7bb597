"""Reading what the engine keeps, with no other tool: `state`, `events`, `result`, `readmodel`.

Each prints something a person reads (a table, or pretty JSON) and, with ``--json``, exactly what
is stored, for scripts. Exit status: 0 found, 1 nothing there (or a rejected command), 2 error,
3 no outcome yet.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Optional

import typer
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.js.errors import BucketNotFoundError, NotFoundError

from ..engine.mapper import CAUSATION
from ..naming import (
    COMMANDS_STREAM,
    EVENT_PREFIX,
    EVENTS_STREAM,
    RESULTS_BUCKET,
    STATE_BUCKET,
    InvalidName,
    aggregate_state_key,
    check_token,
    process_state_key,
    snake_case,
)
from ..store.jetstream import StoredMessage, direct_get, direct_get_batch
from ..store.readmodel import CHECKPOINT_PREFIX, is_valid_key
from ..store.results import read_result
from .common import NATS_URL, app, duration_seconds, fail, nats_client, run

AS_JSON = typer.Option(False, "--json", help="exactly what is stored, for scripts")
NOT_FOUND, REJECTED, NO_OUTCOME = 1, 1, 3
PAGE = 256
FOLLOW_POLL_SECONDS = 0.25


def _token(value: str, what: str) -> str:
    try:
        return check_token(value, what)
    except InvalidName as exc:
        fail(str(exc))


def _write_exact(data: bytes) -> None:
    sys.stdout.buffer.write(data + b"\n")
    sys.stdout.buffer.flush()


def _pretty(data: bytes) -> str:
    try:
        return json.dumps(json.loads(data), indent=2, ensure_ascii=False)
    except ValueError:
        return data.decode(errors="replace")


def _deleted(msg: StoredMessage) -> bool:
    return msg.headers.get("KV-Operation") in ("DEL", "PURGE")


# -- state ------------------------------------------------------------------------------------------

@app.command()
def state(
    name: str = typer.Argument(..., help="the aggregate (or, with --process-manager, the process manager)"),
    key: str = typer.Argument(..., help="the instance's key, e.g. an account number"),
    process_manager: bool = typer.Option(False, "--process-manager", help="a process manager's state "
                                                                          "(pm.NAME.KEY) instead"),
    as_json: bool = AS_JSON,
    nats_url: str = NATS_URL,
) -> None:
    """Print one instance's state from CC_STATE.

    It is the component's state JSON as stored (with --json, exactly those bytes), caught up by
    the daemon after each event. A process manager's state exists while its process runs.
    """
    name, key = _token(name, "name"), _token(key, "key")
    state_key = process_state_key(name, key) if process_manager else aggregate_state_key(name, key)
    msg = run(_last(nats_url, f"KV_{STATE_BUCKET}", f"$KV.{STATE_BUCKET}.{state_key}"))
    if msg is None or _deleted(msg):
        what = f"process {name} {key}" if process_manager else f"{name} {key}"
        reason = ("its process has ended" if msg is not None and process_manager else
                  "it was deleted" if msg is not None else
                  "no such instance" + ("" if process_manager else ", or no event of it folded in yet"))
        print(f"no state for {what} ({state_key} in {STATE_BUCKET}): {reason}", file=sys.stderr)
        raise typer.Exit(NOT_FOUND)
    if as_json:
        _write_exact(msg.data)
        return
    folded = msg.headers.get("Concordance-Event-Sequence", "?")
    typer.echo(f"{state_key}, up to event {folded}:")
    typer.echo(_pretty(msg.data))


async def _last(url: str, stream: str, subject: str) -> StoredMessage | None:
    """The last message on ``subject``, None if there is none; fails if the stream does not exist."""
    async with nats_client(url) as nc:
        try:
            return await direct_get(nc, stream, last_by_subj=subject)
        except NoRespondersError:
            fail(f"there is no stream {stream} on this server: has a daemon run against it (--nats-url)?")


# -- result -----------------------------------------------------------------------------------------

@app.command()
def result(
    seq: int = typer.Argument(..., help="the command's sequence: the seq of the ack its sender got"),
    wait: bool = typer.Option(False, "--wait", help="if there is no outcome yet, wait for it (up to --timeout)"),
    timeout: float = typer.Option(30.0, help="seconds --wait waits"),
    as_json: bool = AS_JSON,
    nats_url: str = NATS_URL,
) -> None:
    """Print what became of a command, from CC_RESULTS (kept for a day).

    Exit status: 0 accepted, 1 rejected, 3 no outcome (yet).
    """
    outcome, last_command = run(_result(nats_url, seq, timeout if wait else 0.0))
    if outcome is None:
        if seq > last_command:
            reason = f"there is no command {seq} yet (the last is {last_command})"
        else:
            reason = "not decided yet, or older than a day" + ("" if wait else " (--wait waits for it)")
        print(f"no outcome for command {seq}: {reason}", file=sys.stderr)
        raise typer.Exit(NO_OUTCOME)
    if as_json:
        _write_exact(outcome)
    else:
        typer.echo(_outcome_line(seq, json.loads(outcome)))
    if json.loads(outcome).get("status") == "rejected":
        raise typer.Exit(REJECTED)


async def _result(url: str, seq: int, wait: float) -> tuple[bytes | None, int]:
    """The outcome of command ``seq`` by its sequence alone (``*.*.{seq}`` in CC_RESULTS)."""
    async with nats_client(url) as nc:
        js = nc.jetstream()
        last_command = (await js.stream_info(COMMANDS_STREAM)).state.last_seq
        try:
            return await read_result(nc, seq, wait=wait), last_command
        except NoRespondersError:
            fail(f"there is no bucket {RESULTS_BUCKET} on this server: has a daemon run against it (--nats-url)?")


def _outcome_line(seq: int, outcome: dict[str, Any]) -> str:
    what = " ".join(str(outcome[f]) for f in ("aggregate", "key", "command_type") if outcome.get(f))
    if outcome.get("status") == "accepted":
        events = ", ".join(outcome.get("events") or []) or "none"
        return f"command {seq} ({what}): accepted, events: {events}"
    return f"command {seq} ({what}): {outcome.get('status')}: {outcome.get('error')}"


# -- events -----------------------------------------------------------------------------------------

@app.command()
def events(
    stream: Optional[str] = typer.Option(None, help="only this stream's events (an aggregate's, or e.g. interbank)"),
    key: Optional[str] = typer.Option(None, help="only this key's events"),
    event_type: Optional[str] = typer.Option(None, "--type", help="only events of this type"),
    since: Optional[str] = typer.Option(None, help="from this CC_EVENTS sequence (a number), time (ISO 8601, "
                                                   "UTC unless it says), or age (30s, 15m, 2h, 1d)"),
    follow: bool = typer.Option(False, "--follow", "-f", help="then wait for new events until Ctrl-C"),
    as_json: bool = typer.Option(False, "--json", help="one CloudEvent per line, as stored, for scripts"),
    nats_url: str = NATS_URL,
) -> None:
    """Print events from CC_EVENTS, oldest first: a table, or CloudEvents JSON lines with --json.

    The table shows each event's sequence, time, type, stream and key, the command that caused it
    (cause), and its data.
    """
    subject = ".".join((EVENT_PREFIX, snake_case(_token(event_type, "event type")) if event_type else "*",
                        _token(stream, "stream") if stream else "*", _token(key, "key") if key else "*"))
    start_seq, start_time = _since(since)
    printer = _JsonLines() if as_json else _Table()
    run(_events(nats_url, subject, start_seq, start_time, follow, printer))


def _since(since: str | None) -> tuple[int, datetime | None]:
    """(first sequence, start time) from --since."""
    if since is None:
        return 1, None
    if since.isdigit():
        return max(int(since), 1), None
    try:
        when = datetime.now(timezone.utc) - timedelta(seconds=duration_seconds(since))
    except ValueError:
        try:
            when = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            fail(f"--since {since!r} is not a sequence number, an ISO 8601 time or an age such as 15m")
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
    return 1, when.astimezone(timezone.utc)


async def _events(url: str, subject: str, start_seq: int, start_time: datetime | None, follow: bool,
                  printer: "_Table | _JsonLines") -> None:
    async with nats_client(url) as nc:
        last_stored = (await nc.jetstream().stream_info(EVENTS_STREAM)).state.last_seq
        seen = await _history(nc, subject, start_seq, start_time, printer)
        if printer.count == 0 and not follow:
            print(f"no events on {subject}", file=sys.stderr)
        if follow:
            # from just after what was read and what was stored then: nothing twice, nothing missed
            await _follow(nc, subject, max(seen, last_stored, start_seq - 1) + 1, printer)


async def _history(nc: NATS, subject: str, start_seq: int, start_time: datetime | None,
                   printer: "_Table | _JsonLines") -> int:
    """Print every stored event on ``subject`` from the start given; return the last sequence seen."""
    if start_time is not None and start_time > datetime.now(timezone.utc):
        return 0  # nothing stored yet (and the server reads times far ahead as long ago)
    last = 0
    while True:
        if start_time is not None and last == 0:
            page = await direct_get_batch(nc, EVENTS_STREAM, subject, limit=PAGE,
                                          start_time=start_time.isoformat().replace("+00:00", "Z"))
        else:
            page = await direct_get_batch(nc, EVENTS_STREAM, subject, start_seq=max(last + 1, start_seq), limit=PAGE)
        printer.print(page)
        if page:
            last = page[-1].seq
        if len(page) < PAGE:
            return last


async def _follow(nc: NATS, subject: str, from_seq: int, printer: "_Table | _JsonLines") -> None:
    """Print each event as it is stored, read with direct gets as the history is: a reader needs
    no right to create consumers (with it, one could rewrite the daemons' own; see nats-config)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    while not stopping.is_set():
        page = await direct_get_batch(nc, EVENTS_STREAM, subject, start_seq=from_seq, limit=PAGE)
        printer.print(page)
        if page:
            from_seq = page[-1].seq + 1
        if len(page) < PAGE:  # caught up: look again shortly
            try:
                await asyncio.wait_for(stopping.wait(), FOLLOW_POLL_SECONDS)
            except asyncio.TimeoutError:
                pass


def _cloud_event(msg: StoredMessage) -> dict[str, Any] | None:
    try:
        event = json.loads(msg.data)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "type" in event else None


class _JsonLines:
    """Each stored CloudEvent on one line, as stored; anything else on an event subject is named on stderr."""

    def __init__(self) -> None:
        self.count = 0

    def print(self, page: Iterable[StoredMessage]) -> None:
        for msg in page:
            if _cloud_event(msg) is None:
                print(f"event {msg.seq} on {msg.subject} is not a CloudEvent; left out", file=sys.stderr)
                continue
            data = msg.data if b"\n" not in msg.data else json.dumps(json.loads(msg.data)).encode()
            sys.stdout.buffer.write(data + b"\n")
            self.count += 1
        sys.stdout.buffer.flush()


class _Table:
    """Aligned columns, the header printed once; a column widens when a value needs it."""

    COLUMNS = ("SEQ", "TIME", "TYPE", "STREAM", "KEY", "CAUSE", "DATA")

    def __init__(self) -> None:
        self.count = 0
        self._widths = [6, 19, 22, 11, 8, 11, 0]

    def print(self, page: Iterable[StoredMessage]) -> None:
        rows = [self._row(msg) for msg in page]
        if not rows:
            return
        if self.count == 0:
            self._widths = [max(w, *(len(r[i]) for r in rows)) if i < 6 else 0 for i, w in enumerate(self._widths)]
            self._echo(self.COLUMNS)
        for row in rows:
            self._echo(row)
            self.count += 1

    def _echo(self, row: tuple[str, ...]) -> None:
        cells = [row[0].rjust(self._widths[0])] + [c.ljust(w) for c, w in zip(row[1:-1], self._widths[1:-1])]
        typer.echo("  ".join([*cells, row[-1]]).rstrip())

    @staticmethod
    def _row(msg: StoredMessage) -> tuple[str, ...]:
        parts = msg.subject.split(".")
        event_type, stream, key = (parts + ["", "", "", "", ""])[2:5]
        cause = msg.headers.get(CAUSATION, "")
        event = _cloud_event(msg)
        if event is None:
            return (str(msg.seq), msg.time[:19].replace("T", " "), event_type, stream, key, cause,
                    f"<not a CloudEvent: {len(msg.data)} bytes>")
        when = str(event.get("time", msg.time))[:19].replace("T", " ")
        data = json.dumps(event.get("data"), ensure_ascii=False, separators=(", ", ": "))
        return str(msg.seq), when, str(event["type"]), stream, key, cause, data


# -- read models ------------------------------------------------------------------------------------

@app.command()
def readmodel(
    name: str = typer.Argument(..., help="the projector's or notifier's NAME"),
    key: Optional[str] = typer.Argument(None, help="one key; or a pattern, * for one token and > for the "
                                                   "rest (e.g. 'ledger.ABC123.>'); default: every key"),
    bucket: Optional[str] = typer.Option(None, help="the bucket, if its link names one (READ_MODEL_BUCKET); "
                                                    "default CC_RM_{NAME}"),
    as_json: bool = typer.Option(False, "--json", help="one key: exactly its stored value; several: one JSON "
                                                       "object of key to value"),
    nats_url: str = NATS_URL,
) -> None:
    """Print a projector's or notifier's read model: one key's value, or a table of keys and values."""
    bucket = bucket or f"CC_RM_{_token(name, 'name')}"
    pattern = key is not None and any(t in ("*", ">") for t in key.split("."))
    if key is not None and not _valid_pattern(key):
        fail(f"read-model key {key!r} is not a valid key or pattern")
    if key is not None and not pattern:
        msg = run(_last(nats_url, f"KV_{bucket}", f"$KV.{bucket}.{key}"))
        if msg is None or _deleted(msg):
            print(f"no key {key} in read model {name} (bucket {bucket})", file=sys.stderr)
            raise typer.Exit(NOT_FOUND)
        if as_json:
            _write_exact(msg.data)
        else:
            typer.echo(_pretty(msg.data))
        return
    entries, checkpoints = run(_entries(nats_url, bucket, key or ">"))
    if as_json:
        typer.echo(json.dumps({k: _value(v) for k, v in entries}, ensure_ascii=False))
        return
    if not entries:
        print(f"no keys{' matching ' + key if key else ''} in read model {name} (bucket {bucket})", file=sys.stderr)
        raise typer.Exit(NOT_FOUND)
    width = max(len("KEY"), *(len(k) for k, _ in entries))
    typer.echo(f"{'KEY'.ljust(width)}  VALUE")
    for k, v in entries:
        typer.echo(f"{k.ljust(width)}  {json.dumps(_value(v), ensure_ascii=False, separators=(', ', ': '))}")
    for consumer, seq in checkpoints:
        typer.echo(f"({consumer} has applied events up to {seq})")


def _valid_pattern(key: str) -> bool:
    tokens = key.split(".")
    plain = ".".join("x" if t in ("*", ">") else t for t in tokens)
    return ">" not in tokens[:-1] and is_valid_key(plain)


def _value(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")


async def _entries(url: str, bucket: str, pattern: str) -> tuple[list[tuple[str, bytes]], list[tuple[str, str]]]:
    """(key, value) of every live key matching ``pattern``, sorted; and the handlers' checkpoints."""
    prefix = f"$KV.{bucket}."
    async with nats_client(url) as nc:
        try:
            # the stream's subject list, not KeyValue.keys(), which can miss keys while they are written
            info = await nc.jetstream().stream_info(f"KV_{bucket}", subjects_filter=prefix + pattern)
        except (NotFoundError, BucketNotFoundError):
            fail(f"no read model in bucket {bucket}: is the name right? (`concordance status` lists consumers)")
        entries, checkpoints = [], []
        for subject in sorted(info.state.subjects or {}):
            msg = await direct_get(nc, f"KV_{bucket}", last_by_subj=subject)
            if msg is None or _deleted(msg):
                continue
            key = subject[len(prefix):]
            if key.startswith(CHECKPOINT_PREFIX + "."):
                checkpoints.append((key[len(CHECKPOINT_PREFIX) + 1:], msg.data.decode()))
            else:
                entries.append((key, msg.data))
        return entries, checkpoints
