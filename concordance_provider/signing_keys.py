"""Account and service nkeys: seeds, public keys and Ed25519 signatures, as wasmCloud signs claims.

A provider archive's claims are signed by an account key (public key ``A...``) and name the
provider's service key (``V...``) as their subject. The nkeys package knows the account kind but
not the service kind, so both are encoded here with its CRC and PyNaCl's Ed25519.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import nacl.exceptions
import nacl.signing
from nkeys import crc16_checksum

SEED_PREFIX = 18 << 3  # base32 "S"


class KeyKind(Enum):
    """The nkey kinds a provider archive uses, by their prefix byte."""

    ACCOUNT = 0  # base32 "A": signs the claims (the issuer)
    SERVICE = 21 << 3  # base32 "V": the provider the claims are about (the subject)

    @property
    def letter(self) -> str:
        return "V" if self is KeyKind.SERVICE else "A"


class NKeyError(ValueError):
    """A seed or public key that is not of the expected kind, or not an nkey at all."""


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=")


def encode_checked(payload: bytes) -> str:
    """An nkey's text: base32 of its prefix bytes and key, with their CRC16 (every nkey kind)."""
    return _b32(payload + crc16_checksum(payload))


def decode_checked(text: str) -> bytes:
    """The payload of a base32 nkey, its two CRC bytes checked and removed."""
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise NKeyError("not base32") from None
    if len(raw) < 3 or crc16_checksum(raw[:-2]) != raw[-2:]:
        raise NKeyError("its checksum does not match")
    return raw[:-2]


def public_key_bytes(public_key: str, kind: KeyKind | None = None) -> bytes:
    """The 32 Ed25519 bytes of a public nkey (``A...``, ``V...``); NKeyError if it is not one."""
    raw = decode_checked(public_key.strip())
    if len(raw) != 33 or (kind is not None and raw[0] != kind.value):
        expected = f"an {kind.name.lower()} public key ({kind.letter}...)" if kind else "a public nkey"
        raise NKeyError(f"{public_key[:1]}... is not {expected}")
    return raw[1:]


def verify(public_key: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``data`` by ``public_key``."""
    try:
        nacl.signing.VerifyKey(public_key_bytes(public_key)).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, NKeyError):
        return False
    return True


@dataclass(frozen=True, repr=False)
class SigningKey:
    """One nkey pair. ``repr`` shows only the public key: the seed must never reach a log."""

    kind: KeyKind
    seed: str
    _signing: nacl.signing.SigningKey

    @classmethod
    def generate(cls, kind: KeyKind) -> "SigningKey":
        return cls.from_raw(kind, os.urandom(32))

    @classmethod
    def from_raw(cls, kind: KeyKind, raw: bytes) -> "SigningKey":
        header = bytes([SEED_PREFIX | kind.value >> 5, (kind.value & 31) << 3])
        payload = header + raw
        return cls(kind, encode_checked(payload), nacl.signing.SigningKey(raw))

    @classmethod
    def from_seed(cls, seed: str, kind: KeyKind) -> "SigningKey":
        """The key of an ``S...`` seed; NKeyError if it is not a seed of ``kind``."""
        try:
            raw = decode_checked(seed.strip())
        except NKeyError as exc:
            raise NKeyError(f"not an nkey seed: {exc}") from None
        if len(raw) != 34 or raw[0] & 0xF8 != SEED_PREFIX:
            raise NKeyError("not an nkey seed (S...)")
        prefix = (raw[0] & 7) << 5 | (raw[1] & 0xF8) >> 3
        if prefix != kind.value:
            raise NKeyError(f"a seed of another kind (S{_b32(raw[:2])[1]}...), not an {kind.name.lower()} "
                            f"seed (S{kind.letter}...)")
        return cls.from_raw(kind, raw[2:])

    @classmethod
    def from_file(cls, path: Path, kind: KeyKind) -> "SigningKey":
        """The seed a file holds (as wash writes its ``.nk`` files: the seed alone)."""
        try:
            return cls.from_seed(path.read_text(), kind)
        except NKeyError as exc:
            raise NKeyError(f"{path}: {exc}") from None

    @property
    def public_key(self) -> str:
        payload = bytes([self.kind.value]) + bytes(self._signing.verify_key)
        return encode_checked(payload)

    def sign(self, data: bytes) -> bytes:
        return self._signing.sign(data).signature

    def write_seed(self, path: Path) -> None:
        """Write the seed to a new file only its owner can read; FileExistsError if one is there."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.seed + "\n")

    def __repr__(self) -> str:
        return f"SigningKey({self.kind.name.lower()} {self.public_key})"
