"""The streams and buckets of the wire contract: created if missing, checked if present."""

from __future__ import annotations

from dataclasses import replace

import structlog
from nats.js import JetStreamContext
from nats.js.api import (
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import BadRequestError, NotFoundError

from ..naming import (
    COMMAND_PREFIX,
    COMMANDS_STREAM,
    EVENT_PREFIX,
    EVENTS_STREAM,
    RESULTS_BUCKET,
    STATE_BUCKET,
)
from .deadletters import deadletter_config

log = structlog.get_logger(__name__)

DAY = 24 * 3600.0


class IncompatibleStream(Exception):
    """A stream or bucket exists with a configuration this engine cannot work with."""


def commands_config() -> StreamConfig:
    # A day of deduplication: a process manager re-sending its commands after a crash is
    # recognised by their message ids. Commands come with the key in the body only
    # (cc.commands.{aggregate}) or in the subject too (cc.commands.{aggregate}.{key}).
    return StreamConfig(
        name=COMMANDS_STREAM, subjects=[f"{COMMAND_PREFIX}.*", f"{COMMAND_PREFIX}.*.*"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE, duplicate_window=DAY, allow_direct=True,
    )


def events_config() -> StreamConfig:
    # A day of deduplication: events re-published after a crash (by message id) are dropped.
    return StreamConfig(
        name=EVENTS_STREAM, subjects=[f"{EVENT_PREFIX}.>"], retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE, allow_atomic=True, allow_direct=True, duplicate_window=DAY,
    )


def _check(existing: StreamConfig, wanted: StreamConfig) -> list[str]:
    """What makes an existing stream unusable. Subjects it lacks are not a problem (they are
    added); subjects it has beyond the wanted ones are."""
    problems = []
    if existing.retention != wanted.retention:
        problems.append(f"retention is {existing.retention}, needs {wanted.retention}")
    if not set(existing.subjects or []) <= set(wanted.subjects or []):
        problems.append(f"subjects are {existing.subjects}, needs {wanted.subjects}")
    return problems


def _missing_subjects(existing: StreamConfig, wanted: StreamConfig) -> list[str]:
    have = set(existing.subjects or [])
    return [subject for subject in wanted.subjects or [] if subject not in have]


async def ensure_stream(js: JetStreamContext, wanted: StreamConfig) -> None:
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        await js.add_stream(wanted)
        log.info("stream created", stream=wanted.name)
        return
    problems = _check(info.config, wanted)
    if problems:
        raise IncompatibleStream(
            f"stream {wanted.name} exists with an incompatible configuration: {'; '.join(problems)}. "
            f"Remove or migrate it (nats stream rm {wanted.name}) before starting"
        )
    features = {"allow_atomic": wanted.allow_atomic, "allow_direct": wanted.allow_direct}
    missing: dict[str, object] = {k: v for k, v in features.items() if v and not getattr(info.config, k)}
    added = _missing_subjects(info.config, wanted)
    if added:  # e.g. a CC_COMMANDS made before commands could name their key in the subject
        missing["subjects"] = [*(info.config.subjects or []), *added]
    if missing:
        await js.update_stream(replace(info.config, **missing))
        log.info("stream updated", stream=wanted.name, enabled=sorted(k for k in missing if k != "subjects"),
                 subjects_added=added)


async def ensure_bucket(js: JetStreamContext, bucket: str, *, ttl: float | None = None,
                        atomic: bool = False) -> None:
    """A KV bucket with history 1; ``atomic`` lets several keys be written all-or-nothing."""
    try:
        info = await js.stream_info(f"KV_{bucket}")
    except NotFoundError:
        info = await _create_bucket(js, bucket, ttl)
    if (info.config.max_msgs_per_subject or 0) > 1:
        log.info("bucket keeps history; only the latest value is used", bucket=bucket)
    wanted = {"allow_direct": True, **({"allow_atomic": True} if atomic else {})}
    missing = {k: v for k, v in wanted.items() if not getattr(info.config, k)}
    if ttl is not None and abs((info.config.max_age or 0) - ttl) > 0.001:  # retention is a setting
        log.info("bucket retention changed", bucket=bucket, seconds=ttl, was=info.config.max_age)
        missing["max_age"] = ttl
    if missing:
        await js.update_stream(replace(info.config, **missing))


async def _create_bucket(js: JetStreamContext, bucket: str, ttl: float | None) -> StreamInfo:
    try:
        await js.create_key_value(KeyValueConfig(
            bucket=bucket, history=1, ttl=ttl, storage=StorageType.FILE, direct=True,
        ))
    except BadRequestError as exc:
        # A daemon starting at the same moment made it first, and may have enabled more on it
        # already ("already in use with a different configuration"): then it is there to use.
        try:
            return await js.stream_info(f"KV_{bucket}")
        except NotFoundError:
            raise IncompatibleStream(f"cannot create KV bucket {bucket}: {exc.description}") from None
    log.info("bucket created", bucket=bucket)
    return await js.stream_info(f"KV_{bucket}")


async def ensure_all(js: JetStreamContext, results_ttl: float = DAY) -> None:
    await ensure_stream(js, commands_config())
    await ensure_stream(js, events_config())
    await ensure_stream(js, deadletter_config())
    await ensure_bucket(js, STATE_BUCKET)
    await ensure_bucket(js, RESULTS_BUCKET, ttl=results_ttl)


async def stream_infos(js: JetStreamContext, names: list[str]) -> dict[str, StreamInfo | None]:
    """Each named stream's info (``$JS.API.STREAM.INFO.{name}``), None for one that does not
    exist; a KV bucket is the stream ``KV_{bucket}``."""
    found: dict[str, StreamInfo | None] = {}
    for name in names:
        try:
            found[name] = await js.stream_info(name)
        except NotFoundError:
            found[name] = None
    return found
