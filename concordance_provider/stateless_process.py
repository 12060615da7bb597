"""The stateless handlers in a second process, so that a second core works beside the aggregates.

One Python process uses about one core (the GIL), and a projector's work per event is about as
large as the aggregate's per command. With ``concordance up --stateless-process`` the first
process links the manifest's aggregates and starts a second one, the same daemon with
``--roles projector,notifier,process_manager``, on the same NATS server. The two share nothing but
NATS, as two daemons on two machines do, so every guarantee holds unchanged.

The second process stops when the first does: asked to (SIGTERM, by its PID) when the first
stops, and by itself when its standard input, a pipe from the first process, closes, which
covers a first process killed with ``-9``. If it ends on its own, the first process stops too,
saying so, as it does when one of its own consumers ends.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from .links import Role

log = structlog.get_logger(__name__)

STATELESS_ROLES = frozenset({Role.PROJECTOR, Role.NOTIFIER, Role.PROCESS_MANAGER})
STOP_SECONDS = 30.0  # how long it may take to finish its in-flight messages before it is killed
# Commands come first: the second process runs this much nicer than the first, so that on a busy
# machine the aggregates' event loop is not kept waiting behind a projector's batch. Read models
# trail by design, and a projector that trails takes larger batches, at less CPU per event.
# Measured at 1,060 commands/s on 2 cores, four runs each: p99 23-29 ms against 26-36 ms.
NICER_BY = 10
# Secrets go in its environment (readable by its owner only), never on its command line; these
# would name them a second time.
_SECRET_FILES = ("NATS_PASSWORD_FILE", "NATS_TOKEN_FILE")


def parse_roles(text: str) -> frozenset[Role]:
    """Roles from a comma-separated list such as ``projector,notifier``; ValueError naming a bad one."""
    roles = set()
    for word in filter(None, (part.strip() for part in text.split(","))):
        try:
            roles.add(Role(word))
        except ValueError:
            raise ValueError(f"unknown role {word!r}: expected some of "
                             f"{', '.join(r.value for r in Role)}") from None
    if not roles:
        raise ValueError("no role named")
    return frozenset(roles)


@dataclass
class StatelessProcess:
    """The second process: ``arguments`` to ``concordance up`` after the manifest, and ``environment``
    for what may hold a secret (NATS_URL, NATS_PASSWORD, NATS_TOKEN)."""

    manifest: Path
    arguments: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_FILES}
        env.update(self.environment)
        roles = ",".join(sorted(role.value for role in STATELESS_ROLES))
        command = [sys.executable, "-m", "concordance_provider.cli", "up", str(self.manifest),
                   "--roles", roles, "--stop-with-stdin", *self.arguments]
        # stdout and stderr are this process's: its log lines go where these go
        self.process = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.PIPE, env=env)
        # before its interpreter has started a thread: each thread takes its creator's niceness
        niceness = os.getpriority(os.PRIO_PROCESS, 0) + NICER_BY
        os.setpriority(os.PRIO_PROCESS, self.process.pid, niceness)
        log.info("stateless handlers started in a second process", pid=self.process.pid, roles=roles,
                 niceness=niceness)

    async def ended(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM by PID, then wait for it to finish its in-flight messages; killed if it takes too long."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_SECONDS)
        except asyncio.TimeoutError:
            log.error("the stateless process did not stop in time; killing it", pid=process.pid,
                      seconds=STOP_SECONDS)
            process.kill()
            await process.wait()
        if process.stdin is not None:
            process.stdin.close()


async def stop_when_stdin_closes(stopping: asyncio.Event) -> None:
    """Set ``stopping`` when standard input reaches its end: the first process is gone."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass
    if not stopping.is_set():
        log.info("the first process is gone; stopping")
        stopping.set()
