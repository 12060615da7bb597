"""Dead letters: `deadletters list|show|retry|purge`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from nats.js.errors import NotFoundError

from ..naming import (
    COMMANDS_STREAM,
    DEADLETTER_PREFIX,
    DEADLETTER_STREAM,
    RETRY_FOR,
    retry_subject,
)
from ..engine.mapper import CAUSATION, MESSAGE_ID
from ..signing import SIGNATURE, Forged, Signer, SigningKeyError
from ..store.deadletters import DeadLetter, DeadLetters
from ..store.jetstream import publish
from .common import NATS_URL, App, app, fail, nats_client, run

deadletters = App(help="List, show, retry and purge dead letters (stream CC_DEADLETTER).",
                          no_args_is_help=True)
app.add_typer(deadletters, name="deadletters")


async def _with_store(url: str, work):  # type: ignore[no-untyped-def]
    async with nats_client(url) as nc:
        try:
            await nc.jetstream().stream_info(DEADLETTER_STREAM)
        except NotFoundError:
            raise Refused(f"stream {DEADLETTER_STREAM} does not exist: no daemon has used this server yet, "
                               f"or it was deleted (a running daemon creates it again within seconds)") from None
        return await work(nc, DeadLetters(nc))


def _run(work):  # type: ignore[no-untyped-def]
    """``run``, with a refusal (a dead letter or its stream that is not there) said in one line."""
    try:
        return run(work)
    except Refused as exc:
        fail(str(exc))


@deadletters.command("list")
def deadletters_list(consumer: Optional[str] = typer.Option(None, help="only this consumer's"),
                     nats_url: str = NATS_URL) -> None:
    """One line per dead letter: sequence, consumer, original subject, deliveries, reason."""
    letters = _run(_with_store(nats_url, lambda nc, store: store.list(consumer)))
    for letter in letters:
        typer.echo(f"{letter.seq}\t{letter.consumer}\t{letter.subject}\t{letter.deliveries}\t{letter.reason}")
    typer.echo(f"{len(letters)} dead letter(s)", err=True)


@deadletters.command("show")
def deadletters_show(seq: int, nats_url: str = NATS_URL) -> None:
    """The whole dead letter as JSON, with its body decoded when it is text."""
    letter = _run(_with_store(nats_url, lambda nc, store: store.get(seq)))
    if letter is None:
        fail(f"no dead letter {seq}")
    shown = letter.model_dump()
    try:
        shown["body"] = letter.body.decode()
    except UnicodeDecodeError:
        pass
    typer.echo(json.dumps(shown, indent=2))


@deadletters.command("retry")
def deadletters_retry(seq: int, nats_url: str = NATS_URL, signing_key_file: Optional[Path] = typer.Option(
        None, envvar="CONCORDANCE_SIGNING_KEY_FILE", help="the daemons' signing key, if they have one")) -> None:
    """Send a dead message again, exactly once, and remove the dead letter.

    A command goes back to its subject. An event goes back to its subject with the suffix
    `.retry`, for the one consumer that failed it: other handlers skip it, aggregates never fold it.
    With the daemons' signing key, a dead event is sent again only if it is genuine, signed anew.
    """
    try:
        signer = Signer.from_file(signing_key_file) if signing_key_file else None
    except SigningKeyError as exc:
        fail(str(exc))

    async def work(nc, store):  # type: ignore[no-untyped-def]
        letter = await store.get(seq)
        if letter is None:
            raise Refused(f"no dead letter {seq}")
        if letter.consumer.startswith("AGG_EVT_"):
            raise Refused(f"dead letter {seq} is aggregate state catch-up: run concordance rebuild instead")
        headers = {"Nats-Msg-Id": f"retry:{seq}"}
        subject = letter.subject
        if letter.stream != COMMANDS_STREAM:
            subject = retry_subject(letter.subject) if not letter.subject.endswith(".retry") else letter.subject
            kept = {k: v for k, v in letter.headers.items() if not k.startswith("Nats-")}
            headers = {**kept, **headers, RETRY_FOR: letter.consumer}
            if signer is not None:
                headers[SIGNATURE] = _signed_again(signer, letter, subject, headers)
        new_seq = await publish(nc, subject, letter.body, headers)
        await store.remove(nc.jetstream(), seq)
        return subject, new_seq

    subject, new_seq = _run(_with_store(nats_url, work))
    typer.echo(f"dead letter {seq} sent again on {subject} as {new_seq}")


def _signed_again(signer: Signer, letter: DeadLetter, subject: str, headers: dict[str, str]) -> str:
    """The signature of a genuine dead event sent again on ``subject``; Refused for a forged one."""
    try:
        signer.verify_event(letter.subject, letter.headers.get(MESSAGE_ID), letter.headers.get(CAUSATION),
                            letter.body, letter.headers.get(SIGNATURE))
    except Forged as exc:
        raise Refused(f"dead letter {letter.seq} is not an event the daemons wrote ({exc}); not sent again")
    return signer.sign_event(subject, headers[MESSAGE_ID], headers.get(CAUSATION, ""), letter.body)


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

    _run(_with_store(nats_url, work))
    typer.echo("purged")


class Refused(Exception):
    """A dead letter, or its stream, that the command cannot act on."""


