"""What a component's calls cost and how they failed: recently, for status reports, and in
total, as Prometheus metrics per component and function."""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..metrics import observe_call

RECENT_CALLS = 512
RECENT_ERRORS = 10


@dataclass
class CallStats:
    component: str = ""
    calls: int = 0
    failures: int = 0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_CALLS))
    errors: deque[dict[str, str]] = field(default_factory=lambda: deque(maxlen=RECENT_ERRORS))

    def record(self, started: float, error: Exception | None = None, function: str = "call") -> None:
        """One call of ``function`` (the interface's name, e.g. ``handle-command``) that began at
        ``started`` (``time.perf_counter()``) and failed with ``error``, if given."""
        elapsed = time.perf_counter() - started
        observe_call(self.component, function, elapsed, failed=error is not None)
        self.calls += 1
        self.durations.append(elapsed)
        if error is not None:
            self.failures += 1
            self.errors.append({"time": datetime.now(timezone.utc).isoformat(), "error": str(error)})

    def report(self) -> dict[str, object]:
        recent = sorted(self.durations)
        latency = {}
        if recent:
            latency = {
                "mean_ms": round(statistics.fmean(recent) * 1000, 3),
                "p50_ms": round(recent[len(recent) // 2] * 1000, 3),
                "p99_ms": round(recent[min(len(recent) - 1, int(len(recent) * 0.99))] * 1000, 3),
            }
        return {"calls": self.calls, "failures": self.failures, "latency": latency,
                "recent_errors": list(self.errors)}
