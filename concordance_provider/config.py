"""How the daemon reaches NATS: an external server with credentials, or its own."""

from __future__ import annotations

import base64
import re
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, SecretStr

_URL_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")


def redact(text: str) -> str:
    """``text`` with the user and password taken out of every URL in it, for logs and errors."""
    return _URL_CREDENTIALS.sub(r"\1", text)


class SecretError(ValueError):
    """A secret file that cannot be read, or holds nothing."""


def read_secret_file(path: Path, what: str) -> SecretStr:
    """The secret a file holds (its first line, without the line break); a clear error if the file
    cannot be read or holds nothing. Files keep secrets off the command line, where every local
    user reads them in /proc/PID/cmdline."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SecretError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from None
    secret = text.split("\n", 1)[0].rstrip("\r")
    if not secret:
        raise SecretError(f"{what} {path} is empty: its first line is the secret")
    return SecretStr(secret)


def one_secret(value: str | None, path: Path | None, what: str) -> SecretStr | None:
    """A secret from its file if one is named, else from its value (a flag or the environment)."""
    if path is not None:
        return read_secret_file(path, f"{what} file")
    return SecretStr(value) if value else None


class NatsOptions(BaseModel):
    url: str
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    creds_file: Path | None = None  # NATS JWT + nkey seed
    user_jwt: SecretStr | None = None  # the same, given in memory (a wasmCloud host's HostData)
    user_seed: SecretStr | None = None
    tls_ca: Path | None = None
    js_domain: str | None = None
    inbox_prefix: str | None = None  # a user's own inboxes, e.g. _INBOX_alice, instead of _INBOX

    @property
    def safe_url(self) -> str:
        """The URL without any user:password in it, for logs."""
        if "://" not in self.url:  # nats-py takes user:password@host:port too
            return redact(f"nats://{self.url}").removeprefix("nats://")
        return redact(self.url)

    def connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"servers": [self.url], "max_reconnect_attempts": -1, "reconnect_time_wait": 1}
        if self.user:
            kwargs["user"] = self.user
            kwargs["password"] = self.password.get_secret_value() if self.password else ""
        if self.token:
            kwargs["token"] = self.token.get_secret_value()
        if self.creds_file:
            kwargs["user_credentials"] = str(self.creds_file)
        if self.user_jwt and self.user_seed:
            kwargs.update(self._jwt_callbacks(self.user_jwt.get_secret_value(), self.user_seed.get_secret_value()))
        if self.tls_ca:
            kwargs["tls"] = ssl.create_default_context(cafile=str(self.tls_ca))
        if self.inbox_prefix:
            kwargs["inbox_prefix"] = self.inbox_prefix
        return kwargs

    @staticmethod
    def _jwt_callbacks(jwt: str, seed: str) -> dict[str, Any]:
        import nkeys  # installed with nats-py[nkeys]; only needed for JWT authentication

        key_pair = nkeys.from_seed(seed.encode())
        return {"user_jwt_cb": lambda: jwt.encode(),
                "signature_cb": lambda nonce: base64.b64encode(key_pair.sign(nonce.encode()))}
