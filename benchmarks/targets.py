"""The performance targets, each with its measured value and whether it is met, printed as one table.

A target not met is a finding, not a failure: ``make bench`` measures and reports.
"""

from __future__ import annotations

from dataclasses import dataclass

MULTI_KEY_RATIO = 2.0  # over many keys: daemon / pyeventsourcing at least this
SINGLE_KEY_RATIO = 0.5  # on one key: the same, on pyeventsourcing's one-key figure
LOW_LOAD_P50_MS = 3.0  # one command at a time: send until outcome
LOADED_P99_MS = 50.0  # at 80 % of the measured capacity, open loop
LOAD_FRACTION = 0.8
HISTORY_EVENTS = 50_000  # earlier events on the key of the history target
FLAT_WITH_HISTORY = 1.2  # p50 with that history / p50 on a fresh key: equal within noise
LAG_SECONDS = 1.0  # projector: never further behind than this much traffic, and current this soon after


@dataclass(frozen=True)
class Target:
    name: str
    goal: str  # the bound, as written in the table
    measured: str
    met: bool


def at_least(name: str, value: float, bound: float, unit: str = "x", digits: int = 2) -> Target:
    return Target(name, f">= {bound:.{digits}f}{unit}", f"{value:.{digits}f}{unit}", value >= bound)


def at_most(name: str, value: float | None, bound: float, unit: str, digits: int = 1) -> Target:
    """``value`` None means it was never reached within the bench's bound: not met."""
    measured = "not reached" if value is None else f"{value:.{digits}f}{unit}"
    return Target(name, f"<= {bound:.{digits}f}{unit}", measured, value is not None and value <= bound)


def table(targets: list[Target]) -> str:
    rows = [("target", "goal", "measured", "")] + [
        (t.name, t.goal, t.measured, "met" if t.met else "NOT MET") for t in targets]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    met = sum(t.met for t in targets)
    lines.append(f"targets met: {met} of {len(targets)}")
    return "\n".join(lines)

