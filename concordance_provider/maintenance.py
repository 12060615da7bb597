"""Operations on derived data: rebuild aggregate state from the log, replay events to a handler."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

import structlog
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from .engine.repository import AggregateRepository
from .links import Interest, Role
from .manifest import ComponentSpec, Manifest
from .naming import EVENTS_STREAM
from .runtime import Component
from .signing import Signer
from .store.events import EventLog
from .store.jetstream import direct_get
from .store.readmodel import ReadModel
from .store.state import StateStore
from .store.streams import ensure_bucket
from .workers.stateless import StatelessWorker, read_model_bucket

log = structlog.get_logger(__name__)


class MaintenanceError(Exception):
    pass


def find_spec(manifest: Manifest, name: str, roles: set[Role]) -> ComponentSpec:
    for spec in manifest.components:
        if spec.interest.name == name and spec.interest.role in roles:
            return spec
    known = ", ".join(s.interest.name for s in manifest.components if s.interest.role in roles) or "none"
    raise MaintenanceError(f"no {' or '.join(sorted(r.value for r in roles))} named {name!r} in the manifest "
                           f"(known: {known})")


def parse_target(target: str | None, manifest: Manifest) -> list[tuple[ComponentSpec, str | None]]:
    """``bankaccount.ABC123`` -> one instance; ``bankaccount`` -> every instance; None -> all."""
    if target is None:
        return [(s, None) for s in manifest.components if s.interest.role is Role.AGGREGATE]
    name, _, key = target.partition(".")
    return [(find_spec(manifest, name, {Role.AGGREGATE}), key or None)]


async def rebuild_state(repository: AggregateRepository, key: str | None,
                        progress: Callable[[str], None] = lambda key: None) -> int:
    """Recompute state for one key, or every key of the aggregate; return how many."""
    keys = [key] if key else await repository.keys()
    for each in keys:
        await repository.rebuild(each)
        progress(each)
    return len(keys)


def aggregate_repository(nc: NATS, interest: Interest, component: Component,
                         signer: Signer | None = None) -> AggregateRepository:
    """With the daemons' signing key, a rebuild folds only genuine events and signs the state it
    writes; without it, the daemons would take that state for forged and fold the log again."""
    assert interest.stream is not None
    return AggregateRepository(interest.name, interest.stream, component, EventLog(nc, signer),
                               StateStore(nc, signer=signer))


@dataclass(frozen=True)
class ReplayStart:
    seq: int | None = None
    time: datetime | None = None

    @property
    def from_scratch(self) -> bool:
        return self.seq is None and self.time is None


async def reset_handler(nc: NATS, interest: Interest, start: ReplayStart) -> int:
    """Point a projector or notifier back at ``start``; return how many events it will see again.

    The consumer is deleted first, so no event is in flight when its checkpoint moves back; a
    replay from scratch also empties the read model. A running daemon picks the new consumer up.
    """
    js = nc.jetstream()
    name = interest.consumer_name
    try:
        await js.delete_consumer(EVENTS_STREAM, name)
    except NotFoundError:
        pass
    bucket = read_model_bucket(interest)
    model = ReadModel(nc, bucket, name)
    if start.from_scratch:
        await ensure_bucket(js, bucket, atomic=True)  # a read model deleted from outside is made again here
        await js.purge_stream(f"KV_{bucket}")
    else:
        first = start.seq or await _first_seq_at(nc, start.time)
        _, revision = await model.checkpoint()
        await model.apply({}, max(first - 1, 0), revision)
    config = StatelessWorker.consumer_spec(interest).config()
    if start.seq is not None:
        config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, start.seq
    elif start.time is not None:
        config.deliver_policy, config.opt_start_time = DeliverPolicy.BY_START_TIME, start.time.isoformat()
    info = await js.add_consumer(EVENTS_STREAM, config)
    return info.num_pending


async def _first_seq_at(nc: NATS, when: datetime | None) -> int:
    """The first event stored at or after ``when``."""
    msg = await direct_get(nc, EVENTS_STREAM, start_time=when.isoformat() if when else None)
    return msg.seq if msg else 1


async def pending(nc: NATS, interest: Interest) -> int:
    info = await nc.jetstream().consumer_info(EVENTS_STREAM, interest.consumer_name)
    return info.num_pending + info.num_ack_pending


async def wait_drained(nc: NATS, interest: Interest, total: int, progress: Callable[[int], None],
                       stall_seconds: float) -> None:
    """Follow the handler until it has seen every replayed event."""
    done, last_change = 0, asyncio.get_running_loop().time()
    while done < total:
        now_done = total - await pending(nc, interest)
        if now_done > done:
            progress(now_done - done)
            done, last_change = now_done, asyncio.get_running_loop().time()
        elif asyncio.get_running_loop().time() - last_change > stall_seconds:
            raise MaintenanceError(
                f"no progress for {stall_seconds:.0f}s: is a daemon running {interest.consumer_name}? "
                f"The replay is set up and continues when one runs."
            )
        await asyncio.sleep(0.2)
