"""wasmCloud provider archives (PAR): build one for ``concordance provider``, read one back, verify it.

A PAR is a tar, gzip-compressed or not, of ``claims.jwt``, one ``{target}.bin`` executable per
platform (``x86_64-linux``: the host's ARCH-OS) and optionally ``world.wasm``. The claims are a JWT
signed (Ed25519) by the issuer's account nkey; they name the provider's service key as subject and
carry the upper-case hex SHA-256 of every file, so a host refuses an archive whose files changed.
A wasmCloud 1.x host copies the binary of its target out of the archive and execs it with no
arguments and an empty environment. Ours is a POSIX sh launcher that execs a Python environment in
which concordance-provider is installed, at an absolute path fixed when the archive is built.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import json
import re
import shlex
import subprocess
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

from nats.nuid import NUID
from pydantic import BaseModel, ConfigDict, ValidationError

from . import __version__
from .signing_keys import KeyKind, NKeyError, SigningKey, public_key_bytes, verify

CLAIMS_FILE = "claims.jwt"
WIT_WORLD_FILE = "world.wasm"
DEFAULT_TARGET = "x86_64-linux"
GZIP_MAGIC = b"\x1f\x8b"
JWT_HEADER = {"typ": "jwt", "alg": "Ed25519"}  # wascap's header, in its field order
WASCAP_REVISION = 3  # the claims revision wascap writes (and from which it checks hashes)
TARGET_NAME = re.compile(r"^[a-z0-9_]+-[a-z0-9_]+$")  # e.g. x86_64-linux, aarch64-macos


class ArchiveError(ValueError):
    """A provider archive that cannot be built, or read back and trusted; says which rule failed."""


class ProviderMetadata(BaseModel):
    """wascap's ``CapabilityProvider`` claims, under the JWT's ``wascap`` key."""

    model_config = ConfigDict(extra="allow")
    name: str | None = None
    vendor: str
    rev: int | None = None
    ver: str | None = None
    target_hashes: dict[str, str]
    config_schema: Any | None = None


class ProviderClaims(BaseModel):
    """The JWT claims of a provider archive, in wascap's field order (its serialisation order)."""

    model_config = ConfigDict(extra="allow")
    exp: int | None = None
    jti: str
    iat: int
    iss: str
    sub: str
    nbf: int | None = None
    wascap: ProviderMetadata
    wascap_revision: int | None = None


class ProviderArchive(BaseModel):
    """An archive read back and verified: its claims, their JWT and the files they vouch for."""

    model_config = ConfigDict(frozen=True)
    jwt: str
    claims: ProviderClaims
    binaries: dict[str, bytes]  # target -> executable
    wit_world: bytes | None = None
    compressed: bool

    @property
    def targets(self) -> list[str]:
        return sorted(self.binaries)


def file_hash(data: bytes) -> str:
    """The hash a PAR's claims carry for a file: SHA-256, upper-case hex."""
    return hashlib.sha256(data).hexdigest().upper()


def _segment(doc: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode().rstrip("=")


def _unsegment(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_claims(claims: ProviderClaims, issuer: SigningKey) -> str:
    """The signed JWT: base64url (unpadded) header and claims, and the issuer's signature of both."""
    signed = f"{_segment(JWT_HEADER)}.{_segment(claims.model_dump(exclude_none=True))}"
    return f"{signed}.{base64.urlsafe_b64encode(issuer.sign(signed.encode())).decode().rstrip('=')}"


def new_claims(name: str, vendor: str, version: str | None, revision: int | None, issuer: SigningKey,
               subject: SigningKey, hashes: dict[str, str]) -> ProviderClaims:
    """Non-expiring claims, as wascap's ``Claims::<CapabilityProvider>::new`` makes them."""
    return ProviderClaims(jti=NUID().next().decode(), iat=int(time.time()), iss=issuer.public_key,
                          sub=subject.public_key, wascap_revision=WASCAP_REVISION,
                          wascap=ProviderMetadata(name=name, vendor=vendor, rev=revision, ver=version,
                                                  target_hashes=hashes))


def launcher(python: Path) -> bytes:
    """The executable a host runs: no arguments and an empty environment are all it needs. ``-I``
    keeps the host's working directory and any PYTHON* variables out of the import path."""
    interpreter = shlex.quote(str(python))
    return (f"#!/bin/sh\n"
            f"# concordance-provider {__version__}, started by a wasmCloud 1.x host with HostData on stdin.\n"
            f"# It runs the Python environment below, which must exist on the host with\n"
            f"# concordance-provider installed.\n"
            f"PYTHON={interpreter}\n"
            f"if [ ! -x \"$PYTHON\" ]; then\n"
            f"  echo \"concordance provider: no $PYTHON on this host (see --python of provider-archive)\" >&2\n"
            f"  exit 127\n"
            f"fi\n"
            f"exec \"$PYTHON\" -I -m concordance_provider.cli provider\n").encode()


def check_interpreter(python: Path, timeout: float = 60.0) -> str:
    """The concordance-provider version ``python`` runs, started as the launcher starts it (empty
    environment); ArchiveError if it cannot import the package."""
    if not python.is_absolute():
        raise ArchiveError(f"--python {python} must be an absolute path: the host runs the launcher from "
                           f"a directory of its own")
    try:
        done = subprocess.run([str(python), "-I", "-c", "import concordance_provider as c; print(c.__version__)"],
                              env={}, capture_output=True, text=True, timeout=timeout)
    except OSError as exc:
        raise ArchiveError(f"{python} cannot be run: {exc.strerror or exc}") from None
    except subprocess.TimeoutExpired:
        raise ArchiveError(f"{python} did not answer within {timeout:.0f}s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ArchiveError(f"{python} cannot import concordance_provider ({last}); install concordance-provider "
                           f"in that environment")
    return done.stdout.strip()


def build_archive(binaries: dict[str, bytes], issuer: SigningKey, subject: SigningKey, *, name: str,
                  vendor: str, version: str | None = None, revision: int | None = None,
                  wit_world: bytes | None = None, compress: bool = True) -> bytes:
    """A PAR's bytes: claims first, then the WIT world if any, then one ``{target}.bin`` per target."""
    if not binaries:
        raise ArchiveError("a provider archive needs at least one target binary")
    for target in binaries:
        if not TARGET_NAME.match(target):
            raise ArchiveError(f"target {target!r} is not ARCH-OS, such as x86_64-linux")
    if issuer.kind is not KeyKind.ACCOUNT or subject.kind is not KeyKind.SERVICE:
        raise ArchiveError("the issuer must be an account key and the subject a service key")
    hashes = {target: file_hash(data) for target, data in binaries.items()}
    if wit_world is not None:
        hashes[WIT_WORLD_FILE] = file_hash(wit_world)
    jwt = encode_claims(new_claims(name, vendor, version, revision, issuer, subject, hashes), issuer)
    files = [(CLAIMS_FILE, jwt.encode(), 0o644)]
    if wit_world is not None:
        files.append((WIT_WORLD_FILE, wit_world, 0o644))
    files += [(f"{target}.bin", data, 0o755) for target, data in sorted(binaries.items())]
    return _tar(files, compress)


def _tar(files: list[tuple[str, bytes, int]], compress: bool) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, data, mode in files:
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    return gzip.compress(raw, compresslevel=9) if compress else raw


def read_archive(data: bytes) -> ProviderArchive:
    """Read a PAR (gzip-compressed or not) and check every rule a host checks, and the signature:
    ArchiveError names the first rule that fails."""
    compressed = data[:2] == GZIP_MAGIC
    try:
        files = _untar(gzip.decompress(data) if compressed else data)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"not a provider archive: {exc}") from None
    jwt = files.pop("claims", None)
    wit_world = files.pop("world", None)
    if jwt is None or not files:
        raise ArchiveError("not a complete provider archive: it needs claims.jwt and at least one target binary")
    try:
        claims = verify_claims(jwt.decode())
    except UnicodeDecodeError:
        raise ArchiveError("claims.jwt is not text") from None
    _check_hashes(claims.wascap.target_hashes, files, wit_world)
    return ProviderArchive(jwt=jwt.decode(), claims=claims, binaries=files, wit_world=wit_world,
                           compressed=compressed)


def _untar(raw: bytes) -> dict[str, bytes]:
    """Each regular file by its stem (the file name less its last extension), as wasmCloud names them."""
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            extracted = tar.extractfile(member)
            assert extracted is not None  # a regular file always has contents
            files[PurePosixPath(member.name).stem] = extracted.read()
    return files


def verify_claims(jwt: str, now: float | None = None) -> ProviderClaims:
    """The claims of a provider JWT whose header, signature and dates are valid; ArchiveError if not."""
    segments = jwt.strip().split(".")
    if len(segments) != 3:
        raise ArchiveError(f"claims.jwt is not a JWT: {len(segments)} segments, expected 3")
    try:
        header = json.loads(_unsegment(segments[0]))
        doc = json.loads(_unsegment(segments[1]))
        signature = _unsegment(segments[2])
    except (binascii.Error, ValueError) as exc:
        raise ArchiveError(f"claims.jwt is not base64url JSON: {exc}") from None
    if header != JWT_HEADER:
        raise ArchiveError(f"claims.jwt header is {header}, expected {JWT_HEADER}")
    try:
        claims = ProviderClaims.model_validate(doc)
        public_key_bytes(claims.iss)
        public_key_bytes(claims.sub, KeyKind.SERVICE)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ArchiveError(f"claims.jwt does not hold provider claims: {problems}") from None
    except NKeyError as exc:
        raise ArchiveError(f"claims.jwt names a key that is not one: {exc}") from None
    if not verify(claims.iss, f"{segments[0]}.{segments[1]}".encode(), signature):
        raise ArchiveError(f"the claims' signature does not verify with the issuer's public key {claims.iss}")
    now = time.time() if now is None else now
    if claims.exp is not None and claims.exp < now:
        raise ArchiveError("the claims have expired")
    if claims.nbf is not None and claims.nbf > now:
        raise ArchiveError("the claims are not valid yet")
    return claims


def _check_hashes(hashes: dict[str, str], binaries: dict[str, bytes], wit_world: bytes | None) -> None:
    for target, data in sorted(binaries.items()):
        if target not in hashes:
            raise ArchiveError(f"{target}.bin has no hash in the claims")
        if hashes[target] != file_hash(data):
            raise ArchiveError(f"{target}.bin does not match its hash in the claims")
    if wit_world is not None:
        if WIT_WORLD_FILE not in hashes:
            raise ArchiveError(f"{WIT_WORLD_FILE} has no hash in the claims")
        if hashes[WIT_WORLD_FILE] != file_hash(wit_world):
            raise ArchiveError(f"{WIT_WORLD_FILE} does not match its hash in the claims")


def read_archive_file(path: Path) -> ProviderArchive:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArchiveError(f"cannot read {path}: {exc.strerror or exc}") from None
    return read_archive(data)
