"""One PNG: commands/s against commands in flight, and the latency of one command at low load, both sides."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import FuncFormatter  # noqa: E402

from benchmarks.targets import LOW_LOAD_P50_MS  # noqa: E402

DAEMON, PEER = "Concordance daemon", "pyeventsourcing + SQLite"
COLOURS = {DAEMON: "tab:blue", PEER: "tab:orange"}
PLAIN = FuncFormatter(lambda value, _: f"{value:g}")  # 1, 10, 100 on log axes


def _cdf(latencies: list[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(seconds * 1000 for seconds in latencies)
    return ordered, [(i + 1) / len(ordered) for i in range(len(ordered))]


def write(path: Path, sweep: dict[str, dict[int, float]], low_load: dict[str, list[float]], caption: str) -> Path:
    """``sweep``: per side, commands/s by commands in flight; ``low_load``: per side, seconds per command."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(12, 4.8))
    for side, rates in sweep.items():
        levels = sorted(rates)
        throughput.plot(levels, [rates[n] for n in levels], marker="o", label=side, color=COLOURS.get(side))
    throughput.set_xscale("log", base=2)
    throughput.set_xticks(sorted({n for rates in sweep.values() for n in rates}))
    throughput.get_xaxis().set_major_formatter(PLAIN)
    throughput.set_xlabel("commands in flight (each client waits for its outcome)")
    throughput.set_ylabel("commands/s")
    throughput.set_title("Deposits over 50 accounts")
    throughput.set_ylim(bottom=0)
    throughput.grid(True, alpha=0.3)
    throughput.legend()
    for side, latencies in low_load.items():
        xs, ys = _cdf(latencies)
        latency.step(xs, ys, where="post", label=side, color=COLOURS.get(side))
    latency.axvline(LOW_LOAD_P50_MS, color="grey", linestyle="--", linewidth=1)
    latency.annotate(f"target p50 {LOW_LOAD_P50_MS:g} ms", (LOW_LOAD_P50_MS, 0.6), xytext=(-4, 0),
                     textcoords="offset points", fontsize=8, color="grey", ha="right")
    latency.set_xscale("log")
    latency.get_xaxis().set_major_formatter(PLAIN)
    latency.set_xlabel("ms from send to outcome, one command at a time")
    latency.set_ylabel("fraction of commands")
    latency.set_title("Latency at low load (CDF)")
    latency.grid(True, which="both", alpha=0.3)
    latency.legend(loc="lower right")
    figure.suptitle(caption, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
