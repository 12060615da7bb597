"""The wasmCloud 1.x capability-provider protocol.

A host starts the provider with an empty environment and writes one line to its stdin: base64 of
a JSON ``HostData``. The provider connects to ``lattice_rpc_url`` with the given JWT and seed,
links the components named by ``link_definitions`` and then serves, on
``wasmbus.rpc.{lattice}.{provider_key}.``:

- ``linkdefs.put`` / ``linkdefs.del``: link or unlink one component (an interface link definition
  whose target is this provider; the Concordance values travel in its ``source_config``);
- ``health``: ``{"healthy": bool, "message": str | null}``;
- ``config.update``: new provider config; its link-value defaults are applied to every link;
- ``default.shutdown``: finish or hand back in-flight messages, reply, and exit 0.

A linked component runs on a wasmCloud host and is called on ``DISPATCH_SUBJECT`` (default
``cc.dispatch.{lattice}.{source_id}``), or in-process from ``COMPONENT_FILE``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from pathlib import Path
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .daemon import Daemon
from .links import LinkError, link_settings, parse_interest
from .manifest import ComponentSpec

log = structlog.get_logger(__name__)

# Provider config keys that set a default for every link's value of the same name.
LINK_DEFAULTS = frozenset({"MAX_MESSAGES_PER_BATCH", "CALL_TIMEOUT_MS", "MAX_MEMORY_MB", "MAX_DELIVERIES",
                           "ACK_WAIT_MS"})
LOG_LEVELS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning", "warning": "warning",
              "error": "error", "critical": "critical"}


class HostDataError(ValueError):
    """A HostData line that cannot be used."""


class LinkDefinition(BaseModel):
    """wasmCloud's ``InterfaceLinkDefinition``, as a host sends it."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    source_id: str = Field(min_length=1)
    target: str = Field(min_length=1)
    name: str = "default"
    wit_namespace: str = ""
    wit_package: str = ""
    interfaces: tuple[str, ...] = ()
    source_config: dict[str, str] = Field(default_factory=dict)
    target_config: dict[str, str] = Field(default_factory=dict)

    @field_validator("source_id")
    @classmethod
    def _one_subject_token(cls, value: str) -> str:
        if any(c in value for c in " \t\r\n*>"):
            raise ValueError(f"source_id {value!r} may not contain whitespace, '*' or '>'")
        return value

    @property
    def link_id(self) -> str:
        """One component may be linked under several link names; each is its own link."""
        return self.source_id if self.name == "default" else f"{self.source_id}:{self.name}"


class HostData(BaseModel):
    model_config = ConfigDict(extra="ignore")
    host_id: str = ""
    lattice_rpc_prefix: str = Field(min_length=1)
    provider_key: str = Field(min_length=1)
    link_name: str = "default"
    lattice_rpc_url: str = "nats://127.0.0.1:4222"
    lattice_rpc_user_jwt: str = ""
    lattice_rpc_user_seed: str = ""
    instance_id: str = ""
    link_definitions: list[dict[str, Any]] = Field(default_factory=list)  # each checked on its own
    config: dict[str, str] = Field(default_factory=dict)
    default_rpc_timeout_ms: int | None = None
    structured_logging: bool = False
    log_level: str | None = None

    @model_validator(mode="after")
    def _usable_credentials(self) -> "HostData":
        if bool(self.lattice_rpc_user_jwt) != bool(self.lattice_rpc_user_seed):
            raise ValueError("lattice_rpc_user_jwt and lattice_rpc_user_seed go together: give both or neither")
        if self.lattice_rpc_user_seed:
            import nkeys  # installed with nats-py[nkeys]

            try:
                nkeys.from_seed(self.lattice_rpc_user_seed.encode())
            except Exception:  # nkeys raises its own errors, or ValueError from base32
                raise ValueError("lattice_rpc_user_seed is not a valid nkey seed") from None
        return self

    @property
    def python_log_level(self) -> str:
        return LOG_LEVELS.get((self.log_level or "info").lower(), "info")


def describe(exc: ValidationError) -> str:
    """What is wrong and where, without echoing the input (HostData carries a secret seed)."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())


def read_host_data(line: str) -> HostData:
    """Decode the line a host writes to the provider's stdin; HostDataError says what is wrong."""
    text = line.strip()
    if not text:
        raise HostDataError("no HostData on stdin: expected one line of base64-encoded JSON")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HostDataError(f"HostData is not base64: {exc}") from None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HostDataError(f"HostData is not JSON: {exc}") from None
    try:
        return HostData.model_validate(doc)
    except ValidationError as exc:
        raise HostDataError(f"HostData is invalid: {describe(exc)}") from None


def link_spec(link: LinkDefinition, lattice: str, defaults: dict[str, str]) -> ComponentSpec:
    """The component a link definition declares; LinkError if its values are unusable."""
    values = {k.strip().upper(): v for k, v in {**link.target_config, **link.source_config}.items()}
    values = {**{k: v for k, v in defaults.items() if k in LINK_DEFAULTS}, **values}
    interest = parse_interest(values)
    component_file = values.pop("COMPONENT_FILE", None)
    if component_file:
        path = Path(component_file)
        if not path.is_file():
            raise LinkError(f"COMPONENT_FILE {component_file} does not exist on this machine")
        return ComponentSpec(name=link.link_id, interest=interest, path=path)
    subject = values.get("DISPATCH_SUBJECT") or f"cc.dispatch.{lattice}.{link.source_id}"
    if any(not token or token in ("*", ">") or any(c.isspace() for c in token) for token in subject.split(".")):
        raise LinkError(f"DISPATCH_SUBJECT {subject!r} is not a NATS subject without wildcards")
    return ComponentSpec(name=link.link_id, interest=interest, dispatch_subject=subject)


def parse_link(body: bytes | dict[str, Any]) -> LinkDefinition:
    try:
        doc = json.loads(body) if isinstance(body, (bytes, bytearray)) else body
        return LinkDefinition.model_validate(doc)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LinkError(f"link definition is not JSON: {exc}") from None
    except ValidationError as exc:
        raise LinkError(f"link definition is invalid: {describe(exc)}") from None


class ProviderEndpoint:
    """Serves the provider subjects for one daemon."""

    def __init__(self, host: HostData) -> None:
        self.host = host
        self.prefix = f"wasmbus.rpc.{host.lattice_rpc_prefix}.{host.provider_key}"
        self.config = {k.strip().upper(): v for k, v in host.config.items()}
        self.link_defs: dict[str, LinkDefinition] = {}
        self._daemon: Daemon | None = None
        self._nc: NATS | None = None
        self._shutdown_replies: list[asyncio.Task[None]] = []
        self._logger = log.bind(lattice=host.lattice_rpc_prefix, provider=host.provider_key)

    async def start(self, daemon: Daemon) -> None:
        """Link the HostData's links, then serve; called once the daemon is connected."""
        self._daemon, self._nc = daemon, daemon.nc
        for raw in self.host.link_definitions:
            try:
                await self._apply_put(raw)
            except Exception as exc:  # noqa: BLE001 - one link that cannot start must not stop the rest
                self._logger.exception("link from HostData could not be started", error=str(exc))
        assert self._nc is not None
        handlers = {"linkdefs.put": self._on_put, "linkdefs.del": self._on_del, "health": self._on_health,
                    "config.update": self._on_config, "default.shutdown": self._on_shutdown}
        for suffix, handler in handlers.items():
            await self._nc.subscribe(f"{self.prefix}.{suffix}", cb=self._guarded(suffix, handler))
        await self._nc.flush()
        self._logger.info("serving provider subjects", prefix=self.prefix, links=sorted(self.link_defs))

    def _guarded(self, what: str, handler: Any) -> Any:
        async def run(msg: Msg) -> None:
            try:
                answer = await handler(msg)
            except Exception as exc:  # noqa: BLE001 - a bad request must never take the provider down
                self._logger.exception("provider request failed", request=what, error=str(exc))
                answer = {"accepted": False, "error": f"the provider could not do this ({type(exc).__name__}); "
                                                      f"see its log"}
            if answer is not None and msg.reply:
                await msg.respond(json.dumps(answer).encode())
        return run

    async def finish(self) -> None:
        """Called by the daemon once it has stopped its consumers: send the shutdown replies."""
        await asyncio.gather(*self._shutdown_replies, return_exceptions=True)

    async def _apply_put(self, raw: bytes | dict[str, Any]) -> dict[str, Any]:
        try:
            link = parse_link(raw)
            if link.target != self.host.provider_key:
                return {"accepted": False, "error": f"link targets {link.target!r}, not this provider"}
            spec = link_spec(link, self.host.lattice_rpc_prefix, self.config)
            assert self._daemon is not None
            await self._daemon.link(spec)
        except LinkError as exc:
            self._logger.error("link definition refused", error=str(exc))
            return {"accepted": False, "error": str(exc)}
        self.link_defs[link.link_id] = link
        return {"accepted": True, "component": link.link_id, "runs": spec.location}

    async def _on_put(self, msg: Msg) -> dict[str, Any]:
        return await self._apply_put(msg.data)

    async def _on_del(self, msg: Msg) -> dict[str, Any]:
        try:
            link = parse_link(msg.data)
        except LinkError as exc:
            self._logger.error("link deletion refused", error=str(exc))
            return {"accepted": False, "error": str(exc)}
        assert self._daemon is not None
        self.link_defs.pop(link.link_id, None)
        removed = await self._daemon.unlink(link.link_id)
        return {"accepted": True, "component": link.link_id, "was_linked": removed}

    async def _on_health(self, msg: Msg) -> dict[str, Any]:
        assert self._daemon is not None
        return self._daemon.health.report()

    async def _on_config(self, msg: Msg) -> dict[str, Any]:
        try:
            update = json.loads(msg.data)
            if not isinstance(update, dict) or not all(isinstance(v, str) for v in update.values()):
                raise ValueError("expected a JSON object of strings")
        except ValueError as exc:
            return {"accepted": False, "error": f"config update is not a JSON map of strings: {exc}"}
        try:
            link_settings(update)  # the bounds every link's own values are held to
        except LinkError as exc:
            self._logger.error("config update refused", error=str(exc))
            return {"accepted": False, "error": str(exc)}
        self.config = {k.strip().upper(): v for k, v in update.items()}
        ignored = sorted(set(self.config) - LINK_DEFAULTS)
        if ignored:
            self._logger.warning("config keys not understood; ignored", keys=ignored)
        errors = {}
        for link_id, link in list(self.link_defs.items()):
            result = await self._apply_put(link.model_dump())
            if not result["accepted"]:
                errors[link_id] = result["error"]
        return {"accepted": not errors, "errors": errors, "ignored": ignored}

    async def _on_shutdown(self, msg: Msg) -> None:
        try:
            body = json.loads(msg.data or b"{}")
        except ValueError:
            body = {}
        host_id = body.get("host_id") if isinstance(body, dict) else None
        if not self.host.host_id or host_id != self.host.host_id:
            # Only the host that started this provider may stop it (`concordance up` has no host).
            self._logger.warning("shutdown request refused: not from this provider's host", host_id=host_id)
            if msg.reply:
                await msg.respond(json.dumps({"accepted": False, "error": "not this provider's host"}).encode())
            return None
        self._logger.info("shutdown requested by the host")
        assert self._daemon is not None
        self._daemon.stopping.set()
        self._shutdown_replies.append(asyncio.create_task(self._reply_when_stopped(msg)))
        return None

    async def _reply_when_stopped(self, msg: Msg) -> None:
        assert self._daemon is not None
        await self._daemon.consumers_stopped.wait()
        if msg.reply:
            await msg.respond(json.dumps({"accepted": True}).encode())
            assert self._nc is not None
            await self._nc.flush()
