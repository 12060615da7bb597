"""Trace context: a valid traceparent is kept, a missing or malformed one is replaced, hops keep the trace."""

from __future__ import annotations

import pytest

from concordance_provider.tracing import child_of, is_valid, new_traceparent, received, trace_id

GIVEN = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_is_kept():
    assert received(GIVEN) == GIVEN


@pytest.mark.parametrize("bad", [None, "", "garbage", "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                                 "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                                 "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                                 "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"])
def test_a_missing_or_malformed_traceparent_is_replaced_by_a_new_trace(bad):
    made = received(bad)
    assert is_valid(made) and made != bad


def test_a_hop_keeps_the_trace_and_flags_with_a_new_span():
    hop = child_of(GIVEN)
    assert trace_id(hop) == trace_id(GIVEN) and hop.endswith("-01")
    assert hop.split("-")[2] != GIVEN.split("-")[2]


def test_new_traces_differ():
    assert trace_id(new_traceparent()) != trace_id(new_traceparent())
    assert trace_id(child_of(None)) != trace_id(child_of(None))
