"""The fault suite: sustained load, the daemon killed with -9 or crashed at a failpoint, its NATS
server killed, bad input thrown in; then an audit of every command ever stored.

Load (``load.py``): deposits, withdrawals and wire transfers on many bank accounts (the process
manager and the gateway in the loop) and `tally` commands that append several events each, each
published with its own message id, paced. Faults (``chaos.py``), each at a point of the load
drawn from a seeded RNG: ``kill -9`` of the daemon (restarted), ``kill -9`` of its embedded
nats-server (the daemon starts it again), a restart with a random failpoint armed (the daemon
crashes there by itself and is restarted without it), malformed commands. The load goes on
until every fault is made.

Audit (``audit.py``), once nothing is in flight: every CC_COMMANDS sequence, the driver's and the
process managers' alike, read from a mirror of the work queue, is held against sequential
decision in stream order through the real components; findings are lost, duplicated, wrongly
rejected and out of order. Also: every instance's state equals the fold of its events, and the
projector's balances equal the aggregate's.

Run: ``.venv/bin/python -m faults.suite`` (``make faults``). Ends with one quotable line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import nats

from concordance_provider.build import build_component
from concordance_provider.nats_server import free_port

from .audit import audit, mirror_commands
from .chaos import Supervisor, chaos, failpoint_plan, needs_bad_input
from .load import Plan, Progress, Sent, accounts_of, bad_input_plan, drive, quiet, throw

ROOT = Path(__file__).resolve().parents[1]
BANK = ROOT / "examples" / "bankaccount"
TALLY_WASM = ROOT / "faults" / "build" / "tally.wasm"


def with_tally(manifest_text: str, wasm: Path, values: str = "") -> str:
    """The bank manifest with the several-event ``tally`` aggregate linked too (``values``: more
    link values, as ``, KEY: "value"``)."""
    return manifest_text.replace("    - name: concordance\n", f"""    - name: tally
      type: component
      properties:
        image: file://{wasm}
      traits:
        - type: link
          properties:
            target: concordance
            values: {{ROLE: aggregate, NAME: tally, INTEREST: tally{values}}}

    - name: concordance
""")


def write_manifest(folder: Path) -> Path:
    text = (BANK / "app.yaml").read_text().replace("file://./build/", f"file://{BANK}/build/")
    path = folder / "app.yaml"
    path.write_text(with_tally(text, TALLY_WASM))
    return path


async def run(plan: Plan, workdir: Path, budget: float, report_path: Path | None = None) -> int:
    deadline = time.monotonic() + budget
    build_component(ROOT / "faults" / "tally", "aggregate", TALLY_WASM)
    manifest = write_manifest(workdir)
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    supervisor = Supervisor(manifest, workdir, port)
    await supervisor.start()
    watcher = asyncio.create_task(supervisor.watch())
    armings = failpoint_plan(plan)
    spread, kept = bad_input_plan(sum(map(needs_bad_input, armings)))
    sent = Sent()
    progress = Progress(plan.commands)
    supervisor.where = lambda: f"(load at command {progress.count}, sequence {progress.last_seq})"
    try:
        nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=quiet)
        try:
            await mirror_commands(nc.jetstream())
            loading = asyncio.create_task(drive(url, plan, sent, progress, spread, deadline))
            await chaos(plan, supervisor, progress, armings, lambda: throw(nc, sent, kept.pop(0), deadline))
            await loading
        finally:
            await nc.close()
        await supervisor.disarm()
        report = await audit(url, manifest, accounts_of(plan), sent, deadline)
    finally:
        await supervisor.stop(watcher)
    counts = supervisor.counts
    report.update(sent_by_driver=len(sent.all()), kills=counts.kills, nats_restarts=counts.nats_restarts,
                  failpoints_armed=counts.failpoints_armed,
                  failpoint_crashes=counts.failpoint_crashes, unexpected_exits=counts.unexpected_exits,
                  timeline=counts.timeline)
    ok = (all(report[k] == 0 for k in ("lost", "duplicated", "wrongly_rejected", "out_of_order", "unaudited"))
          and not report["fold_mismatches"] and not report["projection_mismatches"]
          and not counts.unexpected_exits)
    print(json.dumps(report, indent=2), file=sys.stderr)
    if report_path is not None:
        report_path.write_text(json.dumps(report, indent=2))
    unaudited = f", unaudited {report['unaudited']}" if report["unaudited"] else ""
    print(f"faults: {report['commands']} commands ({report['from_process_managers']} from process managers), "
          f"{counts.kills} kills, {counts.failpoint_crashes} failpoint crashes, {counts.nats_restarts} NATS restarts, "
          f"{len(sent.bad)} bad inputs, lost {report['lost']}, duplicated {report['duplicated']}, "
          f"wrongly rejected {report['wrongly_rejected']}, out of order {report['out_of_order']}{unaudited}"
          f"{'' if ok else '  FAILED'}")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1500,
                        help="commands the load sends at least (more while faults remain to be made)")
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--nats-restarts", type=int, default=2)
    parser.add_argument("--failpoints", type=int, default=3, help="restarts with a random failpoint armed")
    parser.add_argument("--rate", type=float, default=100.0, help="commands per second the load aims at")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for the whole run")
    parser.add_argument("--keep", type=Path, help="run in this (new) directory and keep its logs and data")
    parser.add_argument("--report", type=Path, help="also write the JSON report to this file")
    args = parser.parse_args()
    plan = Plan(args.commands, args.kills, args.nats_restarts, args.failpoints, rate=args.rate, seed=args.seed)
    if args.keep is not None:
        args.keep.mkdir(parents=True)
        sys.exit(asyncio.run(run(plan, args.keep.resolve(), args.budget, args.report)))
    with tempfile.TemporaryDirectory(prefix="concordance-faults-") as tmp:
        sys.exit(asyncio.run(run(plan, Path(tmp), args.budget, args.report)))


if __name__ == "__main__":
    main()
