"""The metrics module on its own: consumer gauges follow the status report, counters start at 0."""

from __future__ import annotations

from prometheus_client import REGISTRY

from concordance_provider import metrics


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_consumer_gauges_follow_the_status_report_and_forget_gone_consumers():
    report = {"consumers": [
        {"name": "AGG_CMD_unit", "stream": "CC_COMMANDS", "pending": 3, "ack_pending": 2, "redelivered": 1,
         "dead_letters": 4, "stuck": True},
        {"name": "PROJ_unit", "stream": "CC_EVENTS", "error": "consumer missing", "dead_letters": 0},
    ]}
    metrics.set_consumers(report)
    assert _sample("concordance_consumer_pending", consumer="AGG_CMD_unit", stream="CC_COMMANDS") == 3
    assert _sample("concordance_consumer_ack_pending", consumer="AGG_CMD_unit", stream="CC_COMMANDS") == 2
    assert _sample("concordance_consumer_redelivered", consumer="AGG_CMD_unit", stream="CC_COMMANDS") == 1
    assert _sample("concordance_consumer_stuck", consumer="AGG_CMD_unit", stream="CC_COMMANDS") == 1
    assert _sample("concordance_dead_letters_stored", consumer="AGG_CMD_unit") == 4
    assert _sample("concordance_consumer_pending", consumer="PROJ_unit", stream="CC_EVENTS") is None  # unknown
    metrics.set_consumers({"consumers": report["consumers"][1:]})  # AGG_CMD_unit unlinked
    assert _sample("concordance_consumer_pending", consumer="AGG_CMD_unit", stream="CC_COMMANDS") is None
    assert _sample("concordance_consumer_stuck", consumer="PROJ_unit", stream="CC_EVENTS") == 0


def test_a_linked_component_starts_its_counters_at_zero():
    metrics.linked("unit_agg", ["AGG_CMD_unit_agg", "AGG_EVT_unit_agg"])
    assert _sample("concordance_commands_total", aggregate="unit_agg", outcome="accepted") == 0
    assert _sample("concordance_commands_total", aggregate="unit_agg", outcome="rejected") == 0
    assert _sample("concordance_append_conflicts_total", aggregate="unit_agg") == 0
    assert _sample("concordance_dead_letters_total", consumer="AGG_EVT_unit_agg") == 0


def test_a_call_is_timed_and_a_failed_one_counted():
    metrics.observe_call("unit-component", "apply-event", 0.002, failed=False)
    metrics.observe_call("unit-component", "apply-event", 0.3, failed=True)
    labels = {"component": "unit-component", "function": "apply-event"}
    assert _sample("concordance_component_call_seconds_count", **labels) == 2
    assert _sample("concordance_component_call_seconds_bucket", le="0.0025", **labels) == 1
    assert _sample("concordance_component_call_failures_total", **labels) == 1
