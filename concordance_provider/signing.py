"""Events and state no client can forge: a keyed MAC (HMAC-SHA256) on what the daemons write.

With a key shared by the daemons, every event they append and every ``CC_STATE`` record they save
carries a ``Concordance-Signature`` header: a MAC of its content and of its position.

- An aggregate's event is signed with its subject, message id, causation, data, and the instance's
  last sequence its guarded append expected with its index in that append (``prev``, ``index``).
  On a fold, an event stands where it was appended only if no genuine event of the instance lies
  between ``prev`` and it (``Chain``): a genuine event published again later, once the log's
  duplicate window has passed, is refused, on any subject, since the subject is signed too.
- Every event is also signed with the time it was made (``at``). A consumer, which sees one event
  at a time, refuses one stored more than ``REPLAY_WINDOW`` after it was made: a copy published
  within the stream's duplicate window (a day) carries the same message id and is dropped by it.
- A state record is signed with its key, its value (or deletion) and the event sequence it
  reflects: it cannot be moved to another key nor paired with another sequence.
"""

from __future__ import annotations

import base64
import hmac
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .wire import BadMessage

SIGNATURE = "Concordance-Signature"  # header of a signed event or state record
MIN_KEY_BYTES = 32
# How long after it was made a signed event may be stored. Shorter than CC_EVENTS' duplicate window
# (a day), so any copy of an event is either dropped as a duplicate or refused as too late; longer
# than any clock skew between a daemon and the NATS server.
REPLAY_WINDOW = timedelta(hours=1)


class SigningKeyError(Exception):
    """A signing key file that cannot be used, and why."""


class Forged(BadMessage):
    """A message that claims to be an event the daemons wrote, but is not one."""


@dataclass(frozen=True)
class Position:
    """Where an aggregate's event was appended: after the instance's message ``previous`` (what the
    guarded append expected), as the ``index``-th event of that append."""

    previous: int
    index: int


@dataclass(frozen=True)
class Seal:
    """A verified event signature: where the event was appended (None for events that are not an
    aggregate's) and when it was made."""

    position: Position | None
    made_at: datetime


def _mac(key: bytes, *parts: bytes) -> str:
    """One MAC over several fields, each length-prefixed so that no two field lists collide."""
    text = b"".join(len(part).to_bytes(8, "big") + part for part in parts)
    return base64.urlsafe_b64encode(hmac.digest(key, text, "sha256")).decode().rstrip("=")


def _fields(text: str) -> dict[str, str]:
    """``prev=12;index=0;at=...;mac=...`` as a dict; Forged if it is not that."""
    try:
        found = dict(item.split("=", 1) for item in text.split(";"))
    except ValueError:
        raise Forged(f"malformed {SIGNATURE} header") from None
    if "mac" not in found:
        raise Forged(f"{SIGNATURE} header has no mac")
    return found


class Signer:
    """Signs and verifies events and state records with one secret key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise SigningKeyError(f"a signing key must be at least {MIN_KEY_BYTES} bytes, not {len(key)}")
        self._key = key

    @classmethod
    def from_file(cls, path: Path) -> "Signer":
        """The key in ``path``: a file only its owner may read, of at least 32 bytes (one final
        newline is not part of the key, so a key written by ``echo`` or an editor works as well)."""
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):
                raise SigningKeyError(f"signing key file {path} is not a regular file")
            if info.st_mode & 0o077:
                raise SigningKeyError(f"signing key file {path} may be read by others (mode "
                                      f"{stat.S_IMODE(info.st_mode):04o}); make it private: chmod 600 {path}")
            key = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"cannot read signing key file {path}: {exc.strerror or exc}") from None
        key = key.removesuffix(b"\n").removesuffix(b"\r")
        if len(key) < MIN_KEY_BYTES:
            raise SigningKeyError(f"signing key file {path} holds {len(key)} bytes; a key needs at least "
                                  f"{MIN_KEY_BYTES} (e.g. openssl rand -hex 32 > {path})")
        return cls(key)

    # -- events ----------------------------------------------------------------------------------

    def _event_mac(self, subject: str, message_id: str, causation: str, position: Position | None, at: str,
                   data: bytes) -> str:
        where = b"" if position is None else f"{position.previous}:{position.index}".encode()
        return _mac(self._key, b"event", subject.encode(), message_id.encode(), causation.encode(), where,
                    at.encode(), data)

    def sign_event(self, subject: str, message_id: str, causation: str, data: bytes,
                   position: Position | None = None) -> str:
        """The ``Concordance-Signature`` header of an event about to be stored, made now."""
        at = str(time.time_ns() // 1_000_000)
        mac = self._event_mac(subject, message_id, causation, position, at, data)
        where = "" if position is None else f"prev={position.previous};index={position.index};"
        return f"{where}at={at};mac={mac}"

    def verify_event(self, subject: str, message_id: str | None, causation: str | None, data: bytes,
                     signature: str | None) -> Seal:
        """The event's seal if its signature holds; Forged saying why not."""
        if not signature:
            raise Forged("event is not signed")
        if not message_id:
            raise Forged("signed event has no message id")
        found = _fields(signature)
        try:
            position = (Position(int(found["prev"]), int(found["index"]))
                        if "prev" in found or "index" in found else None)
            at = int(found.get("at", ""))
        except (KeyError, ValueError):
            raise Forged(f"malformed {SIGNATURE} header") from None
        expected = self._event_mac(subject, message_id, causation or "", position, found.get("at", ""), data)
        if not hmac.compare_digest(expected, found["mac"]):
            raise Forged("event signature does not verify")
        return Seal(position, datetime.fromtimestamp(at / 1000, timezone.utc))

    # -- state -----------------------------------------------------------------------------------

    def _state_mac(self, key: str, value: str | None, event_seq: int) -> str:
        operation, body = (b"DEL", b"") if value is None else (b"PUT", value.encode())
        return _mac(self._key, b"state", key.encode(), str(event_seq).encode(), operation, body)

    def sign_state(self, key: str, value: str | None, event_seq: int) -> str:
        """The ``Concordance-Signature`` header of a state record (None: its deletion)."""
        return f"mac={self._state_mac(key, value, event_seq)}"

    def state_is_genuine(self, key: str, value: str | None, event_seq: int, signature: str | None) -> bool:
        if not signature:
            return False
        try:
            mac = _fields(signature)["mac"]
        except Forged:
            return False
        return hmac.compare_digest(self._state_mac(key, value, event_seq), mac)


def check_fresh(seal: Seal, stored_at: datetime) -> None:
    """Forged if the event was stored too long after it was made: a copy published again."""
    late = stored_at - seal.made_at
    if late > REPLAY_WINDOW:
        raise Forged(f"a copy of an event made at {seal.made_at.isoformat()}, stored "
                     f"{late.total_seconds():.0f} s later")


class Chain:
    """Whether each event of one instance, read in log order after ``after_seq``, stands where it was
    appended. Only the events admitted count: a forged message between two genuine ones changes
    nothing, while a genuine event stored again later finds itself after its own original.

    ``after_seq`` must be a message the instance had (a state's recorded sequence): a genuine event
    after it was appended expecting it or a later message."""

    def __init__(self, after_seq: int = 0) -> None:
        self._last = after_seq  # the last admitted event (or the floor)
        self._last_position: Position | None = None

    def admits(self, seq: int, position: Position | None) -> bool:
        if position is None:  # not appended by an aggregate: it has no place in an instance's log
            return False
        if position.index == 0:
            admitted = self._last <= position.previous < seq
        else:  # the events of one append are stored together, at consecutive sequences
            admitted = (self._last == seq - 1
                        and self._last_position == Position(position.previous, position.index - 1))
        if admitted:
            self._last, self._last_position = seq, position
        return admitted
