"""The wasmCloud 1.x capability-provider protocol.

A host starts the provider with an empty environment and writes one line to its stdin: base64 of
a JSON ``HostData``. The provider connects to ``lattice_rpc_url`` with the given JWT and seed,
links the components named by ``link_definitions`` and then serves, on
``wasmbus.rpc.{lattice}.{provider_key}.``:

- ``linkdefs.put`` (also on ``wasmbus.rpc.{lattice}.{provider_xkey}.linkdefs.put``, where hosts from
  1.1 send links, their secrets sealed to the provider's xkey) and ``linkdefs.del``: link or
  unlink one component, a link whose target is this provider; its Concordance values are read
  from ``target_config``, then ``source_config`` (the earlier convention);
- ``config.update``: the provider config, whose link-value defaults apply to every link;
- ``health``: ``{"healthy": bool, "message": str | null}``;
- ``default.shutdown``: from this provider's own host only (others get no answer): stop, hand
  back what is in flight, and answer within the host's 300 ms, before it kills the process.

Put, del and config updates are handled one at a time, in the order they arrive. A linked
component runs on a wasmCloud host and is called on ``DISPATCH_SUBJECT`` (default
``cc.dispatch.{lattice}.{source_id}``), or in-process from ``COMPONENT_FILE``, a file of the
configured component directory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .daemon import Daemon
from .links import LinkError, link_settings, parse_interest
from .manifest import ComponentSpec
from .xkeys import XKey, XKeyError

log = structlog.get_logger(__name__)

# Provider config keys that set a default for every link's value of the same name.
LINK_DEFAULTS = frozenset({"MAX_MESSAGES_PER_BATCH", "CALL_TIMEOUT_MS", "MAX_MEMORY_MB", "MAX_DELIVERIES",
                           "ACK_WAIT_MS"})
# Every provider config key understood; COMPONENT_DIR and JS_DOMAIN are read once, at start.
PROVIDER_SETTINGS = LINK_DEFAULTS | {"COMPONENT_DIR", "JS_DOMAIN"}
LOG_LEVELS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning", "warning": "warning",
              "error": "error", "critical": "critical"}
# A host waits 300 ms (--provider-shutdown-delay-ms) for the shutdown answer, then SIGKILLs the
# provider: answer well inside that, whatever is still running.
SHUTDOWN_ANSWER_WITHIN = 0.15


class HostDataError(ValueError):
    """A HostData line that cannot be used."""


def _sealed_bytes(value: Any) -> bytes | None:
    """Sealed secrets as a host sends them: a JSON array of byte values (serde's ``Vec<u8>``)."""
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b <= 255 for b in value):
        return bytes(value)
    raise ValueError("sealed secrets must be an array of byte values")


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
    source_secrets: bytes | None = Field(default=None, repr=False)
    target_secrets: bytes | None = Field(default=None, repr=False)

    @field_validator("source_id")
    @classmethod
    def _one_subject_token(cls, value: str) -> str:
        if any(c in value for c in " \t\r\n*>"):
            raise ValueError(f"source_id {value!r} may not contain whitespace, '*' or '>'")
        return value

    @field_validator("source_secrets", "target_secrets", mode="before")
    @classmethod
    def _sealed(cls, value: Any) -> bytes | None:
        return _sealed_bytes(value)

    @property
    def link_id(self) -> str:
        """One component may be linked under several link names; each is its own link."""
        return link_id(self.source_id, self.name)


class LinkDeletion(BaseModel):
    """A link del body: the link definition with empty configs (hosts from 1.3), or the control
    request ``{source_id, name, wit_namespace, wit_package}`` that hosts 1.0 to 1.2 pass on."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    source_id: str = Field(min_length=1)
    target: str = ""
    name: str = "default"
    wit_namespace: str = ""
    wit_package: str = ""

    @property
    def link_id(self) -> str:
        return link_id(self.source_id, self.name)


def link_id(source_id: str, name: str) -> str:
    return source_id if name == "default" else f"{source_id}:{name}"


class HostData(BaseModel):
    model_config = ConfigDict(extra="ignore")
    host_id: str = ""
    lattice_rpc_prefix: str = Field(min_length=1)
    provider_key: str = Field(min_length=1)
    link_name: str = "default"
    lattice_rpc_url: str = "nats://127.0.0.1:4222"
    lattice_rpc_user_jwt: str = Field(default="", repr=False)
    lattice_rpc_user_seed: str = Field(default="", repr=False)
    instance_id: str = ""
    link_definitions: list[dict[str, Any]] = Field(default_factory=list)  # each checked on its own
    config: dict[str, str] = Field(default_factory=dict)
    secrets: dict[str, Any] = Field(default_factory=dict, repr=False)  # hosts from 1.1; unused here
    host_xkey_public_key: str = ""
    provider_xkey_private_key: str = Field(default="", repr=False)
    default_rpc_timeout_ms: int | None = None
    structured_logging: bool = False
    log_level: str | None = None

    @model_validator(mode="after")
    def _usable_keys(self) -> "HostData":
        if bool(self.lattice_rpc_user_jwt) != bool(self.lattice_rpc_user_seed):
            raise ValueError("lattice_rpc_user_jwt and lattice_rpc_user_seed go together: give both or neither")
        if self.lattice_rpc_user_seed:
            import nkeys  # installed with nats-py[nkeys]

            try:
                nkeys.from_seed(self.lattice_rpc_user_seed.encode())
            except Exception:  # nkeys raises its own errors, or ValueError from base32
                raise ValueError("lattice_rpc_user_seed is not a valid nkey seed") from None
        if bool(self.host_xkey_public_key) != bool(self.provider_xkey_private_key):
            raise ValueError("host_xkey_public_key and provider_xkey_private_key go together: give both or neither")
        if self.provider_xkey_private_key:
            try:
                XKey.from_seed(self.provider_xkey_private_key)
            except XKeyError:
                raise ValueError("provider_xkey_private_key is not a valid xkey seed") from None
            try:
                XKey.from_public_key(self.host_xkey_public_key)
            except XKeyError as exc:
                raise ValueError(f"host_xkey_public_key is not usable: {exc}") from None
        return self

    @property
    def python_log_level(self) -> str:
        return LOG_LEVELS.get((self.log_level or "info").lower(), "info")

    def xkeys(self) -> tuple[XKey, XKey] | None:
        """The provider's own xkey and the host's public one, given by hosts from 1.1."""
        if not self.provider_xkey_private_key:
            return None
        return XKey.from_seed(self.provider_xkey_private_key), XKey.from_public_key(self.host_xkey_public_key)


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


def link_values(link: LinkDefinition) -> dict[str, str]:
    """The Concordance values of a link to this provider: ``target_config`` (what wadm's
    ``target: {config: [...]}`` sets), over ``source_config`` (the earlier convention)."""
    merged = {**link.source_config, **link.target_config}
    return {k.strip().upper(): v for k, v in merged.items()}


def component_file(name: str, component_dir: Path | None) -> Path:
    """The in-process component ``COMPONENT_FILE`` names, which must lie in ``component_dir``.
    The errors never tell whether a file outside the directory exists."""
    if component_dir is None:
        raise LinkError("COMPONENT_FILE is refused: this provider has no component directory "
                        "(COMPONENT_DIR in the provider config, or concordance up --component-dir)")
    root = component_dir.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise LinkError(f"COMPONENT_FILE must name a file in the component directory {root}")
    if not path.is_file():
        raise LinkError(f"COMPONENT_FILE {name!r} is not a file in the component directory {root}")
    return path


def link_spec(link: LinkDefinition, lattice: str, defaults: dict[str, str],
              component_dir: Path | None = None) -> ComponentSpec:
    """The component a link definition declares; LinkError if its values are unusable."""
    values = {**{k: v for k, v in defaults.items() if k in LINK_DEFAULTS}, **link_values(link)}
    interest = parse_interest(values)
    file_name = values.pop("COMPONENT_FILE", None)
    if file_name:
        return ComponentSpec(name=link.link_id, interest=interest, path=component_file(file_name, component_dir))
    subject = values.get("DISPATCH_SUBJECT") or f"cc.dispatch.{lattice}.{link.source_id}"
    if any(not token or token in ("*", ">") or any(c.isspace() for c in token) for token in subject.split(".")):
        raise LinkError(f"DISPATCH_SUBJECT {subject!r} is not a NATS subject without wildcards")
    if not subject.startswith(f"cc.dispatch.{lattice}."):
        # Commands and state go to whoever answers there: only the lattice's dispatch subjects,
        # which an operator grants to its hosts alone, may be named.
        raise LinkError(f"DISPATCH_SUBJECT {subject!r} is outside cc.dispatch.{lattice}.>, the subjects "
                        f"this lattice's hosts answer on")
    return ComponentSpec(name=link.link_id, interest=interest, dispatch_subject=subject)


def _parse(model: type[BaseModel], body: bytes | dict[str, Any], what: str) -> Any:
    try:
        doc = json.loads(body) if isinstance(body, (bytes, bytearray)) else body
        return model.model_validate(doc)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LinkError(f"{what} is not JSON: {exc}") from None
    except ValidationError as exc:
        raise LinkError(f"{what} is invalid: {describe(exc)}") from None


def parse_link(body: bytes | dict[str, Any]) -> LinkDefinition:
    return _parse(LinkDefinition, body, "link definition")  # type: ignore[no-any-return]


def parse_link_deletion(body: bytes | dict[str, Any]) -> LinkDeletion:
    return _parse(LinkDeletion, body, "link deletion")  # type: ignore[no-any-return]


def open_secrets(sealed: bytes | None, keys: tuple[XKey, XKey] | None) -> list[str]:
    """The names of the secrets a host sealed for this provider; LinkError if they cannot be
    opened. Concordance takes no value from secrets: opening them proves they were meant for it."""
    if sealed is None:
        return []
    if keys is None:
        raise LinkError("the link carries sealed secrets, but the host gave this provider no xkey to open them")
    own, host = keys
    try:
        secrets = json.loads(own.open(sealed, host))
    except XKeyError as exc:
        raise LinkError(f"the link's secrets cannot be opened: {exc}") from None
    except ValueError:
        raise LinkError("the link's secrets are not a JSON map once opened") from None
    if not isinstance(secrets, dict):
        raise LinkError("the link's secrets are not a JSON map once opened")
    return sorted(secrets)


Handler = Callable[[Msg], Awaitable[dict[str, Any] | None]]


class ProviderEndpoint:
    """Serves the provider subjects for one daemon.

    ``component_dir``: where ``COMPONENT_FILE`` may name files (none: refused). ``allow_replace``:
    whether a lattice link may replace or unlink a component the daemon's manifest declares.
    """

    def __init__(self, host: HostData, component_dir: Path | None = None, allow_replace: bool = False) -> None:
        self.host = host
        self.prefix = f"wasmbus.rpc.{host.lattice_rpc_prefix}.{host.provider_key}"
        self.config = {k.strip().upper(): v for k, v in host.config.items()}
        configured_dir = self.config.get("COMPONENT_DIR")
        self.component_dir = component_dir or (Path(configured_dir) if configured_dir else None)
        self.allow_replace = allow_replace
        self.link_defs: dict[str, LinkDefinition] = {}
        self._xkeys = host.xkeys()
        self._daemon: Daemon | None = None
        self._nc: NATS | None = None
        self._changes: asyncio.Queue[tuple[str, Handler, Msg]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._shutdown: asyncio.Task[None] | None = None
        self._logger = log.bind(lattice=host.lattice_rpc_prefix, provider=host.provider_key)

    @property
    def put_subjects(self) -> list[str]:
        """Hosts 1.0 send link puts on the provider key, hosts from 1.1 on the provider's xkey too."""
        subjects = [f"{self.prefix}.linkdefs.put"]
        if self._xkeys is not None:
            subjects.append(f"wasmbus.rpc.{self.host.lattice_rpc_prefix}.{self._xkeys[0].public_key()}.linkdefs.put")
        return subjects

    async def start(self, daemon: Daemon) -> None:
        """Link the HostData's links, then serve; called once the daemon is connected."""
        self._daemon, self._nc = daemon, daemon.nc
        unknown = sorted(set(self.config) - PROVIDER_SETTINGS)
        if unknown:
            self._logger.warning("provider config keys not understood; ignored", keys=unknown)
        for raw in self.host.link_definitions:
            try:
                await self._apply_put(raw)
            except Exception as exc:  # noqa: BLE001 - one link that cannot start must not stop the rest
                self._logger.exception("link from HostData could not be started", error=str(exc))
        assert self._nc is not None
        self._tasks.append(asyncio.create_task(self._apply_changes_in_order(), name="provider-link-changes"))
        in_order = {"linkdefs.del": self._on_del, "config.update": self._on_config}
        subjects = {subject: self._on_put for subject in self.put_subjects}
        subjects.update({f"{self.prefix}.{suffix}": handler for suffix, handler in in_order.items()})
        for subject, handler in subjects.items():
            await self._nc.subscribe(subject, cb=self._queued(subject, handler))
        await self._nc.subscribe(f"{self.prefix}.health", cb=self._answered("health", self._on_health))
        await self._nc.subscribe(f"{self.prefix}.default.shutdown", cb=self._on_shutdown)
        await self._nc.flush()
        self._logger.info("serving provider subjects", prefix=self.prefix, links=sorted(self.link_defs),
                          xkey_subject=self._xkeys is not None, component_dir=str(self.component_dir or ""))

    def _queued(self, subject: str, handler: Handler) -> Callable[[Msg], Awaitable[None]]:
        async def enqueue(msg: Msg) -> None:
            await self._changes.put((subject, handler, msg))
        return enqueue

    async def _apply_changes_in_order(self) -> None:
        """Puts, dels and config updates one at a time, as they arrived: a del is never undone by
        a put or an update that started before it."""
        while True:
            subject, handler, msg = await self._changes.get()
            await self._answered(subject, handler)(msg)

    def _answered(self, what: str, handler: Handler) -> Callable[[Msg], Awaitable[None]]:
        async def run(msg: Msg) -> None:
            try:
                answer = await handler(msg)
            except Exception as exc:  # noqa: BLE001 - a bad request must never take the provider down
                self._logger.exception("provider request failed", request=what, error=str(exc))
                answer = {"accepted": False, "error": f"the provider could not do this ({type(exc).__name__}); "
                                                      f"see its log"}
            if answer is not None and msg.reply:
                try:
                    await msg.respond(json.dumps(answer).encode())
                except Exception as exc:  # noqa: BLE001 - the asker left; the work is done
                    self._logger.warning("could not answer a provider request", request=what, error=str(exc))
        return run

    async def finish(self) -> None:
        """Called by the daemon once it has stopped its consumers: answer a shutdown not yet
        answered, and take no more link changes."""
        if self._shutdown is not None:
            await asyncio.gather(self._shutdown, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _manifest_guard(self, name: str, consumer: str | None = None) -> None:
        """LinkError if ``name`` (or ``consumer``) belongs to a component the manifest declares
        and the operator has not allowed the lattice to replace it."""
        daemon = self._daemon
        if self.allow_replace or daemon is None or daemon.manifest is None:
            return
        for declared in daemon.manifest.components:
            if declared.name == name or declared.interest.consumer_name == consumer:
                raise LinkError(f"component {declared.name!r} is declared by the manifest; a lattice link may not "
                                f"replace or remove it (start with --allow-lattice-replace to allow it)")

    async def _apply_put(self, raw: bytes | dict[str, Any]) -> dict[str, Any]:
        try:
            link = parse_link(raw)
            if link.target != self.host.provider_key:
                if link.source_id == self.host.provider_key:
                    # Concordance calls no component: a link from it configures nothing.
                    self._logger.warning("link where this provider is the source; ignored", target=link.target,
                                         link_name=link.name)
                    return {"accepted": False, "error": "this provider is the link's source; Concordance "
                                                        "serves only links that target it"}
                return {"accepted": False, "error": f"link targets {link.target!r}, not this provider"}
            secret_names = open_secrets(link.target_secrets, self._xkeys)
            spec = link_spec(link, self.host.lattice_rpc_prefix, self.config, self.component_dir)
            self._manifest_guard(spec.name, spec.interest.consumer_name)
            assert self._daemon is not None
            unchanged = self.link_defs.get(link.link_id) is not None and self._linked_spec(spec.name) == spec
            if not unchanged:
                await self._daemon.link(spec)
        except LinkError as exc:
            self._logger.error("link definition refused", error=str(exc))
            return {"accepted": False, "error": str(exc)}
        self.link_defs[link.link_id] = link
        if unchanged:
            self._logger.info("link unchanged; nothing to do", component=link.link_id)
        elif secret_names:
            self._logger.info("link secrets opened", component=link.link_id, secrets=secret_names)
        return {"accepted": True, "component": link.link_id, "runs": spec.location, "unchanged": unchanged}

    def _linked_spec(self, name: str) -> ComponentSpec | None:
        assert self._daemon is not None
        linked = self._daemon.links.get(name)
        return linked.spec if linked is not None else None

    async def _on_put(self, msg: Msg) -> dict[str, Any]:
        return await self._apply_put(msg.data)

    async def _on_del(self, msg: Msg) -> dict[str, Any]:
        try:
            deletion = parse_link_deletion(msg.data)
            if deletion.target and deletion.target != self.host.provider_key:
                return {"accepted": False, "error": f"link targets {deletion.target!r}, not this provider"}
            self._manifest_guard(deletion.link_id)
        except LinkError as exc:
            self._logger.error("link deletion refused", error=str(exc))
            return {"accepted": False, "error": str(exc)}
        assert self._daemon is not None
        self.link_defs.pop(deletion.link_id, None)
        removed = await self._daemon.unlink(deletion.link_id)
        return {"accepted": True, "component": deletion.link_id, "was_linked": removed}

    async def _on_health(self, msg: Msg) -> dict[str, Any]:
        assert self._daemon is not None
        return self._daemon.health.report()

    async def _on_config(self, msg: Msg) -> dict[str, Any]:
        """A new provider config (a host sends the whole merged map): all of it applies, or none."""
        try:
            update = json.loads(msg.data)
            if not isinstance(update, dict) or not all(isinstance(v, str) for v in update.values()):
                raise ValueError("expected a JSON object of strings")
        except ValueError as exc:
            return self._config_refused(f"config update is not a JSON map of strings: {exc}")
        config = {k.strip().upper(): v for k, v in update.items()}
        unknown = sorted(set(config) - PROVIDER_SETTINGS)
        if unknown:
            return self._config_refused(f"config keys not understood: {', '.join(unknown)}; nothing was changed")
        for key in ("COMPONENT_DIR", "JS_DOMAIN"):
            if config.get(key, "") != self.config.get(key, ""):
                return self._config_refused(f"{key} is read once, at start; nothing was changed")
        try:
            link_settings({k: v for k, v in config.items() if k in LINK_DEFAULTS})
            specs = [link_spec(link, self.host.lattice_rpc_prefix, config, self.component_dir)
                     for link in self.link_defs.values()]
        except LinkError as exc:
            return self._config_refused(f"{exc}; nothing was changed")
        self.config = config
        assert self._daemon is not None
        for spec in specs:
            await self._daemon.link(spec)
        self._logger.info("provider config updated", keys=sorted(config), links=len(specs))
        return {"accepted": True, "errors": {}}

    def _config_refused(self, error: str) -> dict[str, Any]:
        self._logger.error("config update refused", error=error)
        return {"accepted": False, "error": error}

    async def _on_shutdown(self, msg: Msg) -> None:
        try:
            body = json.loads(msg.data or b"{}")
        except ValueError:
            body = {}
        host_id = body.get("host_id") if isinstance(body, dict) else None
        if not self.host.host_id:
            self._logger.warning("shutdown request ignored: no host started this daemon; stop it with SIGTERM",
                                 host_id=host_id)
            return
        if host_id != self.host.host_id:
            # Two hosts may run this provider id: the request is another host's, for its own
            # provider. An answer would tell that host its provider had stopped.
            self._logger.info("shutdown request for another host; not answered", host_id=host_id)
            return
        if self._shutdown is not None:
            return  # already stopping; the first request is answered
        self._logger.info("shutdown requested by the host")
        self._shutdown = asyncio.create_task(self._shut_down(msg), name="provider-shutdown")

    async def _shut_down(self, msg: Msg) -> None:
        """Stop every consumer at once, hand back what is not settled within the host's window,
        then answer: the host's SIGKILL that follows leaves nothing waiting for an ack wait."""
        daemon = self._daemon
        assert daemon is not None and self._nc is not None
        daemon.stopping.set()
        for linked in list(daemon.links.values()):
            linked.stopping.set()
        try:
            await asyncio.wait_for(daemon.consumers_stopped.wait(), SHUTDOWN_ANSWER_WITHIN)
            handed_back = 0
        except asyncio.TimeoutError:
            handed_back = await hand_back_unsettled(daemon)
        self._logger.info("answering the host's shutdown", handed_back=handed_back)
        if msg.reply:
            await msg.respond(json.dumps({"accepted": True}).encode())
            await self._nc.flush()


async def hand_back_unsettled(daemon: Daemon) -> int:
    """Give every fetched message not yet settled back to the server for redelivery now; a call
    still running may finish, and its redelivery then finds the work done."""
    count = 0
    for linked in list(daemon.links.values()):
        for loop in linked.loops:
            for msg in list(loop.in_flight):
                if msg.is_acked:
                    continue
                try:
                    await msg.nak()
                    count += 1
                except Exception:  # noqa: BLE001 - connection gone: redelivered after ack wait
                    pass
    return count
