"""Least-privilege NATS users for an application: `nats-config`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from pydantic import SecretStr

from ..config import SecretError, read_secret_file
from ..manifest import ManifestError, load_manifest
from ..naming import InvalidName, check_token
from ..permissions import (
    DAEMON_INBOX,
    Application,
    Lattice,
    User,
    inbox_prefix_of,
    keyed_client,
    new_password,
    permissions_of,
    server_config,
)
from .common import app, fail


def _password(user: str, given: Path | None, secrets_dir: Path) -> tuple[SecretStr, Path, bool]:
    """(password, its file, whether it was made now): the file named, else ``{user}.password`` in
    ``secrets_dir``, made with a new random password if missing. Never printed."""
    path = given or secrets_dir / f"{user}.password"
    if given is None and not path.exists():
        secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_password() + "\n")
        return read_secret_file(path, "password file"), path, True
    secret = read_secret_file(path, "password file")
    if any(c in secret.get_secret_value() for c in '"\\') or not secret.get_secret_value().isprintable():
        raise SecretError(f"password file {path}: use printable characters other than \" and \\")
    return secret, path, False


def _instances(client_keys: list[str], application: Application) -> list[tuple[str, str]]:
    """(aggregate, key) of each ``AGGREGATE.KEY``; fails naming a wrong one."""
    found = []
    for given in client_keys:
        aggregate, _, key = given.partition(".")
        if aggregate not in application.aggregates:
            fail(f"--client-key {given!r}: no aggregate {aggregate!r} in the manifest "
                 f"(known: {', '.join(application.aggregates) or 'none'})")
        try:
            found.append((aggregate, check_token(key, "key")))
        except InvalidName as exc:
            fail(f"--client-key {given!r}: {exc}")
    return found


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as out:
        out.write(text)


@app.command("nats-config")
def nats_config(
    manifest: Path = typer.Argument(..., help="the application manifest: its aggregates, consumers and read-model "
                                              "buckets are named in the permissions"),
    output: Path = typer.Option(Path("nats-server.conf"), "-o", "--output", help="the configuration file to write"),
    listen: str = typer.Option("127.0.0.1:4222", help="the server's listen address"),
    store_dir: Optional[Path] = typer.Option(None, help="JetStream's data (default: jetstream/ beside --output)"),
    secrets_dir: Optional[Path] = typer.Option(None, help="where generated passwords are kept, one 0600 file per "
                                                          "user (default: nats-secrets/ beside --output)"),
    daemon_user: str = typer.Option("concordance", help="the daemon's user"),
    daemon_password_file: Optional[Path] = typer.Option(None, help="its password (default: generated)"),
    client_user: str = typer.Option("client", help="a client's user: sends commands, reads what is stored"),
    client_password_file: Optional[Path] = typer.Option(None),
    operator_user: str = typer.Option("operator", help="the operator's user: rebuild, replay, dead letters"),
    operator_password_file: Optional[Path] = typer.Option(None),
    auditor_user: str = typer.Option("auditor", help="a read-only user"),
    auditor_password_file: Optional[Path] = typer.Option(None),
    client_keys: list[str] = typer.Option([], "--client-key", help="AGGREGATE.KEY: hold the client to this "
                                          "instance's commands and outcomes (repeat for more); without it, the "
                                          "client may command every key and read everything stored"),
    lattice: Optional[str] = typer.Option(None, help="the daemon runs with --lattice: let it serve that "
                                                     "lattice's provider subjects and call components on hosts"),
    provider_id: str = typer.Option("concordance", help="with --lattice: the daemon's provider id"),
) -> None:
    """Write a nats-server configuration with one account (JetStream enabled) and four users, each
    allowed only what it needs: the daemon, a client, an operator and a read-only auditor.

    Passwords come from the files named, or are generated into --secrets-dir (mode 0600, kept on
    later runs); they are never printed. Each user but the daemon has its own inbox prefix,
    _INBOX_{user}: give it to the client commands with --inbox-prefix or NATS_INBOX_PREFIX.
    Run this again when the manifest gains a component: each read-model bucket is named.
    """
    try:
        interests = [spec.interest for spec in load_manifest(manifest, need_files=False).components]
    except ManifestError as exc:
        fail(str(exc))
    application = Application.of(interests)
    where = output.resolve().parent
    secrets = (secrets_dir or where / "nats-secrets").resolve()
    chosen = {"daemon": (daemon_user, daemon_password_file), "client": (client_user, client_password_file),
              "operator": (operator_user, operator_password_file), "auditor": (auditor_user, auditor_password_file)}
    if len({name for name, _ in chosen.values()}) < len(chosen):
        fail("each role needs its own user name")
    try:  # every name checked before any password file is made
        for name, _ in chosen.values():
            check_token(name, "user name")
    except InvalidName as exc:
        fail(str(exc))
    prefixes = {role: DAEMON_INBOX if role == "daemon" else inbox_prefix_of(name)
                for role, (name, _) in chosen.items()}
    instances = _instances(client_keys, application)
    users, lines = [], []
    for role, (name, password_file) in chosen.items():
        try:
            password, path, made = _password(name, password_file, secrets)
        except SecretError as exc:
            fail(str(exc))
        prefix = prefixes[role]
        permissions = permissions_of(role, application, prefix, Lattice(name=lattice, provider_id=provider_id)
                                     if lattice else None)
        if role == "client" and instances:
            permissions = keyed_client(instances, prefix)
        users.append(User(name=name, password=password, permissions=permissions))
        lines.append(f"{role:9} user {name}, password in {path}{' (generated)' if made else ''}, "
                     f"inbox prefix {prefix}")
    _write_private(output, server_config(users, listen=listen, store_dir=(store_dir or where / "jetstream").resolve(),
                                         source=str(manifest)))
    typer.echo(f"wrote {output} (mode 0600: it holds the passwords)")
    for line in lines:
        typer.echo(line)
    typer.echo(f"run: nats-server -c {output}")
