"""Shipping the provider to wasmCloud 1.x hosts: `provider-archive` builds a signed PAR and pushes it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .. import __version__
from ..logging import configure
from ..oci_registry import Reference, RegistryClient, RegistryError
from ..provider_archive import DEFAULT_TARGET, ArchiveError, build_archive, check_interpreter, launcher, read_archive
from ..signing_keys import KeyKind, NKeyError, SigningKey
from .common import app, fail

LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def _seed_path(output: Path, kind: KeyKind) -> Path:
    """Beside the archive, named after it: concordance.par.gz -> concordance_account.nk."""
    stem = output.name.removesuffix(".gz").removesuffix(".par")
    return output.with_name(f"{stem}_{kind.name.lower()}.nk")


def _signing_key(path: Path, kind: KeyKind) -> SigningKey:
    """The key in ``path``; a new one, its seed written there (mode 0600), if the file is missing."""
    role = "issuer" if kind is KeyKind.ACCOUNT else "subject"
    if path.exists():
        try:
            key = SigningKey.from_file(path, kind)
        except (NKeyError, OSError) as exc:
            fail(f"{role} seed: {exc}")
        if path.stat().st_mode & 0o077:
            typer.echo(f"warning: {path} can be read by others than its owner: chmod 600 it", err=True)
        typer.echo(f"{role}: {kind.name.lower()} key {key.public_key} (seed from {path})")
        return key
    key = SigningKey.generate(kind)
    try:
        key.write_seed(path)
    except OSError as exc:
        fail(f"cannot write the new {role} seed to {path}: {exc.strerror or exc}")
    typer.echo(f"{role}: new {kind.name.lower()} key {key.public_key}, seed written to {path} (mode 0600); "
               f"keep it to sign later archives of this provider")
    return key


def _check_python(python: Path) -> None:
    """Refuse an interpreter here that cannot run the provider; one that is only on the hosts (the
    archive may be built elsewhere) is named in a warning instead."""
    if python.is_absolute() and not python.exists():
        typer.echo(f"warning: {python} is not on this machine, so it was not checked: it must exist on the "
                   f"hosts, with concordance-provider installed", err=True)
        return
    try:
        installed = check_interpreter(python)
    except ArchiveError as exc:
        fail(str(exc))
    if installed != __version__:
        typer.echo(f"warning: {python} runs concordance-provider {installed}, not {__version__}", err=True)


@app.command("provider-archive")
def provider_archive(
    output: Path = typer.Option(..., "-o", "--output", help="the archive to write: gzip-compressed if the name "
                                                         "ends in .gz (concordance.par.gz), a plain tar if not"),
    issuer_seed: Optional[Path] = typer.Option(None, help="account seed (SA...) that signs the claims; made if the "
                                                          "file is missing (default: NAME_account.nk beside -o)"),
    subject_seed: Optional[Path] = typer.Option(None, help="service seed (SV...) of the provider the claims name; "
                                                           "made if missing (default: NAME_service.nk beside -o)"),
    python: Path = typer.Option(Path(sys.executable).absolute(),
                                help="absolute path, on the hosts, of the Python with concordance-provider "
                                     "installed (default: this one)", show_default=False),
    target: list[str] = typer.Option([DEFAULT_TARGET], help="ARCH-OS target the launcher is filed under "
                                                            "(repeat for several)"),
    name: str = typer.Option("Concordance", help="the provider's name in the claims"),
    vendor: str = typer.Option("Concordance", help="the vendor in the claims"),
    version: str = typer.Option(__version__, help="the version in the claims"),
    revision: int = typer.Option(0, help="the revision in the claims"),
    push: Optional[str] = typer.Option(None, help="OCI reference to push to, REGISTRY/NAME:TAG "
                                                  "(e.g. 127.0.0.1:5001/concordance:0.1.0)"),
    insecure: Optional[bool] = typer.Option(None, help="plain-HTTP registry (default: only for loopback)"),
) -> None:
    """Build a wasmCloud provider archive (PAR) of `concordance provider`, signed, and push it.

    The archive holds a POSIX sh launcher under each target (x86_64-linux unless told): a wasmCloud 1.x
    host runs it with no arguments and an empty environment, and it runs `concordance provider` with
    the Python given by --python, which must exist at that path on every host.

    The claims are signed
    with the issuer's account key; seeds are read from their files, or made and written there (mode
    0600), and never printed.
    """
    configure("warning", "console")
    reference = None
    if push:
        try:
            reference = Reference.parse(push)
        except ValueError as exc:
            fail(str(exc))
    _check_python(python)
    issuer = _signing_key(issuer_seed or _seed_path(output, KeyKind.ACCOUNT), KeyKind.ACCOUNT)
    subject = _signing_key(subject_seed or _seed_path(output, KeyKind.SERVICE), KeyKind.SERVICE)
    executable = launcher(python)
    try:
        data = build_archive({t: executable for t in target}, issuer, subject, name=name, vendor=vendor,
                             version=version, revision=revision, compress=output.name.endswith(".gz"))
        archive = read_archive(data)  # the rules a host checks, on the very bytes written
        output.write_bytes(data)
    except ArchiveError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}")
    typer.echo(f"wrote {output} ({len(data)} bytes): targets {', '.join(archive.targets)}, runs {python}")
    if reference is not None:
        plain_http = insecure if insecure is not None else reference.registry.rsplit(":", 1)[0] in LOOPBACK
        try:
            digest = RegistryClient(reference.registry, insecure=plain_http).push_archive(reference, data)
        except RegistryError as exc:
            fail(f"push to {reference}: {exc}")
        typer.echo(f"pushed {reference} ({digest})")
