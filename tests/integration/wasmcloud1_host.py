"""A wasmCloud 1.x host, as far as a capability provider can tell, written from the host's source.

It does to a provider process what ``wasmcloud`` v1.9.2 or v1.0.0 does (``crates/host/src/wasmbus/``
``providers/mod.rs``, ``mod.rs``, ``ctl.rs``, ``component_spec.rs``; ``crates/core/src/host.rs``,
``link.rs``, ``otel.rs``), byte for byte:

- start: exec ``argv`` with only ``env`` (a host clears the environment but for ``RUST_LOG`` and
  ``OTEL_*``), write base64 (standard, padded) of the compact HostData JSON, then ``\\r\\n``, and
  close stdin;
- link put, published without a reply subject: on ``wasmbus.rpc.{lattice}.{source_id}`` and
  ``.{target}.linkdefs.put`` (only links without secrets, from 1.1), and from 1.1 on
  ``.{provider_xkey}.linkdefs.put`` with the secrets sealed from the host's xkey to the provider's;
- link del: on the source's and the target's ``linkdefs.del``; from 1.3 the link definition with
  empty configs, before that the control request ``{source_id, name, wit_namespace, wit_package}``;
- ``config.update`` (from 1.2): the whole merged provider config, published;
- health: a request with an empty body, first 5 s after start, then every 30 s, 2 s timeout;
- stop: a request ``{"host_id": ...}`` on ``.default.shutdown`` with a 300 ms timeout, then SIGKILL
  whether or not it was answered.

The provider runs from any executable: ``WasmCloud1Host(...).start(argv, env)``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys
from nacl.signing import SigningKey
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout

from concordance_provider.xkeys import XKey

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ARGV = (str(ROOT / ".venv" / "bin" / "concordance"), "provider")
SHUTDOWN_DELAY = 0.3  # --provider-shutdown-delay-ms 300
RPC_TIMEOUT = 2.0  # --rpc-timeout-ms 2000
HEALTH_FIRST = 5.0
HEALTH_EVERY = 30.0


@dataclass(frozen=True)
class HostVersion:
    name: str
    xkeys: bool  # 1.1: HostData secrets and xkeys, puts on the provider's xkey subject
    config_update: bool  # 1.2: config.update
    del_is_link: bool  # 1.3: a link del body is the link definition, not the control request

    @property
    def otel_config(self) -> dict[str, Any]:
        if self.xkeys:  # 1.9.2: Option fields skipped when None, protocol and level serialized
            return {"enable_observability": False, "protocol": "Http", "additional_ca_paths": [],
                    "trace_level": "info"}
        return {"enable_observability": False, "enable_traces": None, "enable_metrics": None, "enable_logs": None,
                "observability_endpoint": None, "traces_endpoint": None, "metrics_endpoint": None,
                "logs_endpoint": None}


V1_9_2 = HostVersion("1.9.2", xkeys=True, config_update=True, del_is_link=True)
V1_0_0 = HostVersion("1.0.0", xkeys=False, config_update=False, del_is_link=False)


def server_nkey() -> str:
    """A host id: the public key of a fresh server nkey (``N...``)."""
    seed = nkeys.encode_seed(bytes(SigningKey.generate()), nkeys.PREFIX_BYTE_SERVER)
    return nkeys.from_seed(seed).public_key.decode()


def compact(doc: Any) -> bytes:
    """JSON as serde_json writes it: no spaces."""
    return json.dumps(doc, separators=(",", ":")).encode()


def trace_headers() -> dict[str, str]:
    """Every host publish carries the W3C trace context of its span."""
    return {"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"}


@dataclass
class Link:
    """A link as the lattice holds it: the provider is its target."""

    source_id: str
    target: str
    target_config: dict[str, str] = field(default_factory=dict)
    source_config: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)  # target secrets, plain (the host seals them)
    name: str = "default"
    wit_namespace: str = "concordance"
    wit_package: str = "eventsourcing"
    interfaces: tuple[str, ...] = ("aggregate",)


class ProviderExited(AssertionError):
    pass


class WasmCloud1Host:
    """One host of ``version`` that runs one provider process."""

    def __init__(self, version: HostVersion, nats_url: str, lattice: str, provider_key: str,
                 config: dict[str, str], log_path: Path, *, structured_logging: bool = True,
                 host_secrets: dict[str, str] | None = None) -> None:
        self.version = version
        self.nats_url = nats_url
        self.lattice = lattice
        self.provider_key = provider_key
        self.config = dict(config)
        self.log_path = log_path
        self.structured_logging = structured_logging
        self.host_secrets = host_secrets or {}
        self.host_id = server_nkey()
        self.links: list[Link] = []
        # A host makes its secrets xkey once, and one xkey per provider it starts.
        self.host_xkey = XKey.generate()
        self.provider_xkey = XKey.generate()
        self.process: subprocess.Popen[bytes] | None = None
        self.health_answers: list[dict[str, Any] | None] = []
        self._health_task: asyncio.Task[None] | None = None

    # -- what the host sends ------------------------------------------------------------------

    def link_definition(self, link: Link, *, for_deletion: bool = False, sealed: bool = True) -> dict[str, Any]:
        """``InterfaceLinkDefinition`` as the host serializes it (field order of the struct)."""
        doc: dict[str, Any] = {
            "source_id": link.source_id, "target": link.target, "name": link.name,
            "wit_namespace": link.wit_namespace, "wit_package": link.wit_package,
            "interfaces": list(link.interfaces),
            "source_config": {} if for_deletion else link.source_config,
            "target_config": {} if for_deletion else link.target_config,
        }
        if self.version.xkeys:
            secrets = None
            if link.secrets and sealed and not for_deletion:
                plain = compact({k: {"kind": "String", "value": v} for k, v in link.secrets.items()})
                secrets = list(self.host_xkey.seal(plain, XKey.from_public_key(self.provider_xkey.public_key())))
            doc["source_secrets"] = None
            doc["target_secrets"] = secrets
        return doc

    def host_data(self) -> dict[str, Any]:
        """``HostData`` in the field order of the version's struct."""
        doc: dict[str, Any] = {
            "host_id": self.host_id, "lattice_rpc_prefix": self.lattice, "link_name": "default",
            "lattice_rpc_user_jwt": "", "lattice_rpc_user_seed": "", "lattice_rpc_url": self.nats_url,
            "provider_key": self.provider_key, "env_values": {}, "instance_id": str(uuid.uuid4()),
            "link_definitions": [self.link_definition(link) for link in self.links],
            "cluster_issuers": [], "config": self.config,
        }
        if self.version.xkeys:
            doc["secrets"] = {k: {"kind": "String", "value": v} for k, v in self.host_secrets.items()}
            doc["host_xkey_public_key"] = self.host_xkey.public_key()
            doc["provider_xkey_private_key"] = self.provider_xkey.seed()
        doc.update({"default_rpc_timeout_ms": int(RPC_TIMEOUT * 1000),
                    "structured_logging": self.structured_logging, "log_level": "info",
                    "otel_config": self.version.otel_config})
        return doc

    def stdin_line(self) -> bytes:
        return base64.b64encode(compact(self.host_data())) + b"\r\n"

    # -- the provider process -----------------------------------------------------------------

    def start(self, argv: tuple[str, ...] | list[str] = DEFAULT_ARGV, env: dict[str, str] | None = None) -> None:
        """Exec the provider as the host does: ``argv`` with only ``env``, HostData on stdin."""
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(env or {}), cwd=str(self.log_path.parent))
        finally:
            log.close()
        assert self.process.stdin is not None
        self.process.stdin.write(self.stdin_line())
        self.process.stdin.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL by PID, as dropping the child with ``kill_on_drop`` does."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """The provider's JSON log lines (structured logging)."""
        found = []
        for line in self.log_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                found.append(entry)
        return found

    async def wait_serving(self, nc: NATS, timeout: float = 120.0) -> None:
        """Until the provider answers health (what the host's first check would find)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ProviderExited(f"provider exited with {self.process.returncode if self.process else None}:\n"
                                     f"{self.log_text()[-4000:]}")
            if await self.health(nc) is not None:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"provider not serving within {timeout}s:\n{self.log_text()[-4000:]}")

    # -- the protocol ---------------------------------------------------------------------------

    def _subject(self, key: str, op: str) -> str:
        return f"wasmbus.rpc.{self.lattice}.{key}.{op}"

    async def put_link(self, nc: NATS, link: Link) -> None:
        """Store the link and publish it on every subject this host version uses."""
        self.links = [known for known in self.links if (known.source_id, known.name) != (link.source_id, link.name)]
        self.links.append(link)
        compat = not link.secrets or not self.version.xkeys  # 1.1+: links with secrets skip the compat path
        if compat:
            body = compact(self.link_definition(link, sealed=False))
            for key in (link.source_id, link.target):
                await nc.publish(self._subject(key, "linkdefs.put"), body, headers=trace_headers())
        if self.version.xkeys:
            body = compact(self.link_definition(link))
            await nc.publish(self._subject(self.provider_xkey.public_key(), "linkdefs.put"), body,
                             headers=trace_headers())

    async def delete_link(self, nc: NATS, link: Link) -> None:
        self.links = [known for known in self.links if (known.source_id, known.name) != (link.source_id, link.name)]
        if self.version.del_is_link:
            body = compact(self.link_definition(link, for_deletion=True))
        else:
            body = compact({"source_id": link.source_id, "name": link.name, "wit_namespace": link.wit_namespace,
                            "wit_package": link.wit_package})
        for key in (link.source_id, link.target):
            await nc.publish(self._subject(key, "linkdefs.del"), body, headers=trace_headers())

    async def update_config(self, nc: NATS, config: dict[str, str]) -> None:
        if not self.version.config_update:
            raise AssertionError(f"a {self.version.name} host sends no config.update")
        self.config = dict(config)
        await nc.publish(self._subject(self.provider_key, "config.update"), compact(self.config))

    async def health(self, nc: NATS) -> dict[str, Any] | None:
        """One health check; None when the provider did not answer in time (the host logs it)."""
        try:
            msg = await nc.request(self._subject(self.provider_key, "health"), b"", timeout=RPC_TIMEOUT,
                                   headers=trace_headers())
        except Exception:  # noqa: BLE001 - no responders or timeout: "failed to request provider health"
            return None
        try:
            answer = json.loads(msg.data)
        except ValueError:
            return None
        return answer if isinstance(answer, dict) else None

    def check_health_on_schedule(self, nc: NATS, first: float = HEALTH_FIRST, every: float = HEALTH_EVERY) -> None:
        """The host's health task: first ``first`` seconds after start, then every ``every``."""
        async def schedule() -> None:
            await asyncio.sleep(first)
            while True:
                self.health_answers.append(await self.health(nc))
                await asyncio.sleep(every)
        self._health_task = asyncio.create_task(schedule())

    async def health_checked(self, count: int = 1, timeout: float = HEALTH_FIRST + 30.0) -> None:
        """Until the scheduled health checks have run ``count`` times."""
        deadline = time.monotonic() + timeout
        while len(self.health_answers) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.health_answers)} of {count} health checks in {timeout}s")
            await asyncio.sleep(0.1)

    async def stop_health(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)

    async def shutdown_request(self, nc: NATS, host_id: str | None = None) -> tuple[bytes | None, float]:
        """The stop request of ``host_id`` (this host's by default): its answer, or None if none came
        within the shutdown delay, and the seconds it took."""
        started = time.monotonic()
        body = compact({"host_id": host_id or self.host_id})
        try:
            msg = await nc.request(self._subject(self.provider_key, "default.shutdown"), body,
                                   timeout=SHUTDOWN_DELAY, headers=trace_headers())
        except (NatsTimeout, asyncio.TimeoutError):
            return None, time.monotonic() - started
        except Exception:  # noqa: BLE001 - no responders: the host kills the provider all the same
            return None, time.monotonic() - started
        return msg.data, time.monotonic() - started

    async def stop_provider(self, nc: NATS) -> tuple[bytes | None, float]:
        """``provider.stop``: no more health checks, the shutdown request, then SIGKILL."""
        await self.stop_health()
        answer = await self.shutdown_request(nc)
        self.kill()
        return answer
