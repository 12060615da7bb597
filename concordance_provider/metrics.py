"""Prometheus metrics of one daemon, served at ``/metrics`` on its health port.

Counters are counted where things happen (outcomes in ``store.results``, dead letters in
``store.deadletters``, component calls in ``runtime.stats``, NATS reconnects in ``daemon``); the
consumer gauges and health are read at each scrape, from the same sources as ``concordance status``.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

log = structlog.get_logger(__name__)

disable_created_metrics()  # no *_created series: the process start time says as much

CONTENT_TYPE = CONTENT_TYPE_LATEST
SCRAPE_READ_SECONDS = 2.0  # how long a scrape waits for consumer info before serving what it has

COMMANDS = Counter("concordance_commands_total", "Command outcomes recorded in CC_RESULTS",
                   ["aggregate", "outcome"])
EVENTS_APPENDED = Counter("concordance_events_appended_total", "Events appended by accepted commands",
                          ["aggregate", "event_type"])
APPEND_CONFLICTS = Counter("concordance_append_conflicts_total",
                           "Appends refused because another writer appended to the instance first "
                           "(the command is decided again)", ["aggregate"])
DEAD_LETTERS = Counter("concordance_dead_letters_total", "Dead letters stored by this daemon", ["consumer"])
CALL_SECONDS = Histogram("concordance_component_call_seconds", "Duration of component calls",
                         ["component", "function"],
                         buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                                  5.0, 10.0, 30.0))
CALL_FAILURES = Counter("concordance_component_call_failures_total",
                        "Component calls that failed (trap, deadline, bad answer; not a rejection)",
                        ["component", "function"])
NATS_DISCONNECTS = Counter("concordance_nats_disconnects_total", "Connections to NATS lost")
NATS_RECONNECTS = Counter("concordance_nats_reconnects_total", "Connections to NATS made again after a loss")
NATS_CONNECTED = Gauge("concordance_nats_connected", "1 while connected to NATS")
HEALTHY = Gauge("concordance_healthy", "1 when GET /health answers 200")
CONSUMER_PENDING = Gauge("concordance_consumer_pending", "Messages of the stream not yet delivered to the consumer",
                         ["consumer", "stream"])
CONSUMER_ACK_PENDING = Gauge("concordance_consumer_ack_pending", "Messages delivered and not yet settled",
                             ["consumer", "stream"])
CONSUMER_REDELIVERED = Gauge("concordance_consumer_redelivered", "Messages delivered more than once, not yet settled",
                             ["consumer", "stream"])
CONSUMER_STUCK = Gauge("concordance_consumer_stuck", "1 while the consumer spends longer than --stuck-after "
                       "on one batch", ["consumer", "stream"])
DEAD_LETTERS_STORED = Gauge("concordance_dead_letters_stored", "Dead letters kept in CC_DEADLETTER now",
                            ["consumer"])

_CONSUMER_GAUGES = {"pending": CONSUMER_PENDING, "ack_pending": CONSUMER_ACK_PENDING,
                    "redelivered": CONSUMER_REDELIVERED}


def linked(aggregate: str | None, consumers: list[str]) -> None:
    """Start a linked component's counters at 0, so that the first increase is seen as one."""
    if aggregate is not None:
        for outcome in ("accepted", "rejected"):
            COMMANDS.labels(aggregate, outcome)
        APPEND_CONFLICTS.labels(aggregate)
    for consumer in consumers:
        DEAD_LETTERS.labels(consumer)


def observe_call(component: str, function: str, seconds: float, failed: bool) -> None:
    CALL_SECONDS.labels(component, function).observe(seconds)
    if failed:
        CALL_FAILURES.labels(component, function).inc()


def set_health(report: dict[str, object], connected: bool) -> None:
    HEALTHY.set(1 if report.get("healthy") else 0)
    NATS_CONNECTED.set(1 if connected else 0)


def set_consumers(status: dict[str, object]) -> None:
    """Consumer gauges from a status report (``StatusReporter.report``): consumers that are gone
    lose their series. No await in here, so concurrent scrapes never see a half-set family."""
    consumers = [c for c in status.get("consumers", []) if isinstance(c, dict)]  # type: ignore[union-attr]
    for gauge in (*_CONSUMER_GAUGES.values(), CONSUMER_STUCK, DEAD_LETTERS_STORED):
        gauge.clear()
    for consumer in consumers:
        labels = (str(consumer["name"]), str(consumer["stream"]))
        for field, gauge in _CONSUMER_GAUGES.items():
            if isinstance(consumer.get(field), int):
                gauge.labels(*labels).set(consumer[field])
        CONSUMER_STUCK.labels(*labels).set(1 if consumer.get("stuck") else 0)
        DEAD_LETTERS_STORED.labels(labels[0]).set(int(consumer.get("dead_letters", 0)))


async def exposition(health: Callable[[], tuple[dict[str, object], bool]],
                     status: Callable[[], Awaitable[dict[str, object]]] | None) -> bytes:
    """The text a scrape gets: health as of now, consumers as JetStream reports them now (or, if it
    does not answer in time, as last read), and every counter."""
    report, connected = health()
    set_health(report, connected)
    if status is not None and connected:
        try:
            set_consumers(await asyncio.wait_for(status(), SCRAPE_READ_SECONDS))
        except Exception as exc:  # noqa: BLE001 - a scrape is answered with what is known
            log.debug("consumer gauges not refreshed", error=str(exc) or type(exc).__name__)
    return generate_latest()
