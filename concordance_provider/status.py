"""Each daemon reports its own status on request over NATS, so every replica of a lattice is visible.

A request on ``cc.status`` is answered by every daemon (no queue group); ``cc.status.{daemon_id}``
by one. The answer: the daemon's identity and health, each link with its parsed interest, its
consumers' pending / ack-pending / redelivered counts, dead letters, recent component errors and
component call latency.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from . import __version__
from .health import Health
from .naming import DEADLETTER_PREFIX, DEADLETTER_STREAM
from .workers.base import ConsumerLoop

if TYPE_CHECKING:
    from .daemon import LinkedComponent

log = structlog.get_logger(__name__)

STATUS_SUBJECT = "cc.status"


def new_daemon_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}".replace(".", "-")


@dataclass
class StatusReporter:
    nc: NATS
    js: JetStreamContext
    health: Health
    application: str
    links: Callable[[], list[LinkedComponent]]
    daemon_id: str = field(default_factory=new_daemon_id)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    async def start(self) -> None:
        await self.nc.subscribe(STATUS_SUBJECT, cb=self._answer)
        await self.nc.subscribe(f"{STATUS_SUBJECT}.{self.daemon_id}", cb=self._answer)

    async def _answer(self, msg: Msg) -> None:
        try:
            body = await self.report()
        except Exception as exc:  # noqa: BLE001 - a partial answer beats none
            body = {"daemon": self.daemon_id, "error": str(exc)}
        if msg.reply:
            await self.nc.publish(msg.reply, json.dumps(body).encode())

    async def report(self) -> dict[str, object]:
        dead = await self._dead_letters()
        links = self.links()
        return {
            "daemon": self.daemon_id, "version": __version__, "application": self.application,
            "host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
            "health": self.health.report(),
            "components": [self._component(linked) for linked in links],
            "consumers": [await self._consumer(loop, dead) for linked in links for loop in linked.loops],
        }

    @staticmethod
    def _component(linked: LinkedComponent) -> dict[str, object]:
        spec = linked.spec
        interest = spec.interest.model_dump(mode="json", exclude_none=True)
        return {"name": spec.name, "runs": spec.location, "interest": interest, **linked.component.stats.report()}

    async def _consumer(self, loop: ConsumerLoop, dead: dict[str, int]) -> dict[str, object]:
        name = loop.spec.durable
        report: dict[str, object] = {"name": name, "stream": loop.spec.stream, "filters": list(loop.spec.filter_subjects),
                                     "dead_letters": dead.get(name, 0)}
        if name in self.health.stuck():
            report["stuck"] = True
        try:
            info = await self.js.consumer_info(loop.spec.stream, name)
            report.update(pending=info.num_pending, ack_pending=info.num_ack_pending,
                          redelivered=info.num_redelivered)
        except NotFoundError:
            report["error"] = "consumer missing"
        return report

    async def _dead_letters(self) -> dict[str, int]:
        info = await self.js.stream_info(DEADLETTER_STREAM, subjects_filter=f"{DEADLETTER_PREFIX}.>")
        return {subject.split(".", 2)[2]: count for subject, count in (info.state.subjects or {}).items()}
