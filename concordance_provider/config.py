"""How the daemon reaches NATS: an external server with credentials, or its own."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, SecretStr


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

    @property
    def safe_url(self) -> str:
        """The URL without any user:password in it, for logs."""
        parsed = urlsplit(self.url)
        return parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")).geturl() \
            if parsed.username or parsed.password else self.url

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
        return kwargs

    @staticmethod
    def _jwt_callbacks(jwt: str, seed: str) -> dict[str, Any]:
        import nkeys  # installed with nats-py[nkeys]; only needed for JWT authentication

        key_pair = nkeys.from_seed(seed.encode())
        return {"user_jwt_cb": lambda: jwt.encode(),
                "signature_cb": lambda nonce: base64.b64encode(key_pair.sign(nonce.encode()))}
