"""Curve keys in the nkeys "xkey" format, and the sealed boxes a wasmCloud host sends secrets in.

An xkey is an X25519 key written as nkeys write keys: base32 of prefix bytes, the 32 raw bytes and
a CRC16 (public keys start with ``X``, seeds with ``SX``). A sealed message is ``xkv1``, a 24-byte
nonce and a NaCl ``crypto_box`` (X25519, XSalsa20-Poly1305) from the sender's key to the recipient's.
"""

from __future__ import annotations

import nkeys
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from .signing_keys import NKeyError, decode_checked, encode_checked

PREFIX_BYTE_CURVE = 23 << 3  # "X"
VERSION_V1 = b"xkv1"
NONCE_SIZE = Box.NONCE_SIZE


class XKeyError(ValueError):
    """A key or sealed message that cannot be used; never says more than what is wrong."""


def _decode(text: str) -> bytes:
    """The checked payload of an nkeys-encoded string (prefix bytes and key, without the CRC)."""
    try:
        return decode_checked(text)
    except NKeyError as exc:
        raise XKeyError(f"not an nkeys-encoded key: {exc}") from None


class XKey:
    """One curve key: a public key, and the private key too when made from a seed."""

    def __init__(self, public: PublicKey, private: PrivateKey | None = None) -> None:
        self._public = public
        self._private = private

    @classmethod
    def generate(cls) -> "XKey":
        private = PrivateKey.generate()
        return cls(private.public_key, private)

    @classmethod
    def from_seed(cls, seed: str) -> "XKey":
        raw = _decode(seed.strip())
        if len(raw) != 34 or raw[0] & 248 != nkeys.PREFIX_BYTE_SEED:
            raise XKeyError("not an nkeys seed")
        if ((raw[0] & 7) << 5 | (raw[1] & 248) >> 3) != PREFIX_BYTE_CURVE:
            raise XKeyError("the seed is not a curve (xkey) seed")
        private = PrivateKey(raw[2:])
        return cls(private.public_key, private)

    @classmethod
    def from_public_key(cls, key: str) -> "XKey":
        raw = _decode(key.strip())
        if len(raw) != 33 or raw[0] != PREFIX_BYTE_CURVE:
            raise XKeyError("not a curve (xkey) public key")
        return cls(PublicKey(raw[1:]))

    def public_key(self) -> str:
        return encode_checked(bytes([PREFIX_BYTE_CURVE]) + bytes(self._public))

    def seed(self) -> str:
        if self._private is None:
            raise XKeyError("a public key has no seed")
        first = nkeys.PREFIX_BYTE_SEED | PREFIX_BYTE_CURVE >> 5
        second = (PREFIX_BYTE_CURVE & 31) << 3
        return encode_checked(bytes([first, second]) + bytes(self._private))

    def seal(self, message: bytes, recipient: "XKey") -> bytes:
        """``message`` sealed from this key to ``recipient``."""
        if self._private is None:
            raise XKeyError("sealing needs a private key")
        return VERSION_V1 + bytes(Box(self._private, recipient._public).encrypt(message))

    def open(self, sealed: bytes, sender: "XKey") -> bytes:
        """The message ``sender`` sealed to this key; XKeyError if it is not one."""
        if self._private is None:
            raise XKeyError("opening needs a private key")
        if len(sealed) <= len(VERSION_V1) + NONCE_SIZE or not sealed.startswith(VERSION_V1):
            raise XKeyError("not a sealed xkv1 message")
        try:
            return Box(self._private, sender._public).decrypt(sealed[len(VERSION_V1):])
        except CryptoError:
            raise XKeyError("the message cannot be opened with this provider's key") from None
