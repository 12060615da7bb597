"""The command line's pure parts: --since, read-model key patterns, help paragraphs."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import typer

from concordance_provider.cli.common import _one_paragraph_per_line
from concordance_provider.cli.read import _since, _valid_pattern


def test_since_takes_a_sequence_a_time_or_an_age():
    assert _since(None) == (1, None)
    assert _since("42") == (42, None)
    assert _since("0") == (1, None)
    assert _since("2026-11-26T10:00:00Z") == (1, datetime(2026, 11, 26, 10, tzinfo=timezone.utc))
    assert _since("2026-11-26T10:00:00") == (1, datetime(2026, 11, 26, 10, tzinfo=timezone.utc))  # UTC unless it says
    assert _since("2026-11-26T12:00:00+02:00") == (1, datetime(2026, 11, 26, 10, tzinfo=timezone.utc))
    seq, when = _since("15m")
    assert seq == 1 and abs(datetime.now(timezone.utc) - timedelta(minutes=15) - when) < timedelta(seconds=5)
    with pytest.raises(typer.Exit):
        _since("yesterday")


@pytest.mark.parametrize("key, valid", [
    ("balance.ABC123", True), ("ledger.ABC123.>", True), ("ledger.*.000001", True), (">", True),
    ("ledger.>.x", False), ("a..b", False), ("bad key", False), ("_cc.checkpoint.PROJ_x", False),
])
def test_read_model_key_patterns(key, valid):
    assert _valid_pattern(key) is valid


def test_help_paragraphs_are_joined_but_kept_apart():
    doc = """Run the daemon
    until Ctrl-C.

    With --lattice it also links
    any component.
    """
    assert _one_paragraph_per_line(doc) == "Run the daemon until Ctrl-C.\n\nWith --lattice it also links any component."
