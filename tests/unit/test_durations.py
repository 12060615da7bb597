"""Durations on the command line: --results-ttl and --since take 90s, 15m, 12h, 7d."""

from __future__ import annotations

import pytest

from concordance_provider.cli.common import duration_seconds


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800), (" 1d ", 86400)])
def test_a_duration_is_read_in_seconds(text, seconds):
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "1w", "-5m", "0s", "1.5h", "d"])
def test_anything_else_is_refused_saying_what_is_expected(text):
    with pytest.raises(ValueError, match="such as 90s, 15m, 12h or 7d"):
        duration_seconds(text)
