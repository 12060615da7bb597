"""Streams and buckets that disappear, or lose events, while the daemon runs.

Looked at on every health probe. Records the daemon only adds to (dead letters, outcomes) and
derived state (``CC_STATE``: aggregates refold from the log) are created again at once. The
sources of truth (``CC_COMMANDS``, ``CC_EVENTS``) and read models are not: created empty, they
would be taken for the real thing (commands numbered from 1 again match the events and outcomes of
old ones; a projector would go on from its last event on an empty read model). Their loss makes the
daemon unhealthy, naming them, until they are back. Events removed from ``CC_EVENTS`` (a purge) are
reported, and leave the daemon healthy: nothing it does can bring them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import structlog
from nats.js import JetStreamContext
from nats.js.api import StreamInfo

from .naming import COMMANDS_STREAM, DEADLETTER_STREAM, EVENTS_STREAM, RESULTS_BUCKET, STATE_BUCKET
from .store.deadletters import deadletter_config
from .store.streams import DAY, ensure_bucket, ensure_stream, stream_infos

log = structlog.get_logger(__name__)

RESTORE = "restore it from a backup and restart the daemon (README: 'Streams that disappear')"
LOST_MEANING = {
    COMMANDS_STREAM: "no command can be stored or decided; created again, commands would be numbered from 1 "
                     "and taken for the old commands of those numbers",
    EVENTS_STREAM: "the event log, the source of truth, is gone; no command can be decided",
}


def events_removed(info: StreamInfo) -> int:
    """How many events were removed from a stream that has no limits to remove them (a purge or a
    deletion from outside); 0 for a stream with limits, which removes events by design."""
    config, state = info.config, info.state
    limits = (config.max_msgs, config.max_bytes, config.max_msgs_per_subject)
    if any(limit not in (None, -1, 0) for limit in limits) or (config.max_age or 0) > 0:
        return 0
    return max(state.last_seq - state.messages, 0)


@dataclass
class StreamWatch:
    js: JetStreamContext
    read_model_buckets: Callable[[], list[str]]  # the buckets of the linked projectors and notifiers
    results_ttl: float = DAY
    problems: list[str] = field(default_factory=list)  # why the daemon is unhealthy; [] when it is not
    notes: list[str] = field(default_factory=list)  # what an operator should know while it is healthy
    _removed: int = 0  # events removed from CC_EVENTS, as last reported

    async def check(self) -> None:
        """Look at every stream and bucket once: create again what can be, report the rest."""
        buckets = sorted(set(self.read_model_buckets()))
        names = [COMMANDS_STREAM, EVENTS_STREAM, DEADLETTER_STREAM, f"KV_{STATE_BUCKET}", f"KV_{RESULTS_BUCKET}",
                 *(f"KV_{bucket}" for bucket in buckets)]
        infos = await stream_infos(self.js, names)
        problems = [f"stream {name} is missing: {LOST_MEANING[name]}; {RESTORE}"
                    for name in (COMMANDS_STREAM, EVENTS_STREAM) if infos[name] is None]
        problems += [f"read-model bucket {bucket} is missing; `concordance replay` rebuilds it from the log"
                     for bucket in buckets if infos[f"KV_{bucket}"] is None]
        problems += await self._recreate(infos)
        for problem in sorted(set(problems) - set(self.problems)):
            log.error("stream lost", problem=problem)
        for problem in sorted(set(self.problems) - set(problems)):
            log.info("stream back", problem=problem)
        self.problems = problems
        events = infos[EVENTS_STREAM]
        self._note_removed(events_removed(events) if events is not None else self._removed)

    async def _recreate(self, infos: dict[str, StreamInfo | None]) -> list[str]:
        """Create again what is missing and can be; the problems of what could not be."""
        replaceable = {
            DEADLETTER_STREAM: (lambda: ensure_stream(self.js, deadletter_config()), "the dead letters it held"),
            f"KV_{RESULTS_BUCKET}": (lambda: ensure_bucket(self.js, RESULTS_BUCKET, ttl=self.results_ttl),
                                     "the outcomes of commands decided before"),
            f"KV_{STATE_BUCKET}": (lambda: ensure_bucket(self.js, STATE_BUCKET),
                                   "the state of process managers' processes under way; aggregates refold "
                                   "from the log"),
        }
        problems = []
        for name, (create, lost) in replaceable.items():
            if infos[name] is not None:
                continue
            try:
                await create()
            except Exception as exc:  # noqa: BLE001 - reported as unhealthy, tried again next probe
                problems.append(f"stream {name} is missing and could not be created again: {exc}")
                continue
            log.error("stream was missing; created again", stream=name, lost=lost)
        return problems

    def _note_removed(self, removed: int) -> None:
        if removed > self._removed:
            log.error("events removed from the log", stream=EVENTS_STREAM, removed=removed,
                      meaning="state and read models hold events the log no longer has; "
                              "rebuild and replay would lose them")
        self._removed = removed
        self.notes = [f"{removed} event(s) were removed from {EVENTS_STREAM} from outside (purged or deleted): "
                      f"state and read models hold events the log no longer has"] if removed else []
