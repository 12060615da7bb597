"""The fault suite, as CI runs it: under kills, failpoint crashes and NATS restarts, every command
stored in CC_COMMANDS (the driver's and the process manager's) has the outcome that deciding the
commands one by one in stream order gives: nothing lost, duplicated, wrongly rejected or out of order."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMMANDS, BAD_INPUTS = 800, 9
LINE = re.compile(
    r"faults: (?P<commands>\d+) commands \((?P<pm>\d+) from process managers\), (?P<kills>\d+) kills, "
    r"(?P<crashes>\d+) failpoint crashes, (?P<restarts>\d+) NATS restarts, (?P<bad>\d+) bad inputs, "
    r"lost (?P<lost>\d+), duplicated (?P<duplicated>\d+), wrongly rejected (?P<wrongly_rejected>\d+), "
    r"out of order (?P<out_of_order>\d+)$"
)


def test_fault_suite_finds_nothing_lost_duplicated_wrongly_rejected_or_out_of_order(example_components, tmp_path):
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "faults.suite", "--commands", str(COMMANDS), "--kills", "3", "--nats-restarts", "2",
         "--failpoints", "3", "--budget", "400", "--report", str(report_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    print(line)
    found = LINE.match(line)
    assert done.returncode == 0 and found, f"{line}\n{done.stderr[-4000:]}"
    counts = {name: int(value) for name, value in found.groupdict().items()}
    assert (counts["lost"], counts["duplicated"], counts["wrongly_rejected"], counts["out_of_order"]) == (0, 0, 0, 0)
    assert (counts["kills"], counts["crashes"], counts["restarts"], counts["bad"]) == (3, 3, 2, BAD_INPUTS)
    # every command is audited: all the driver sent (accounts, load, bad inputs) and what the
    # process manager sent for the wire transfers in the load (about one in ten commands)
    report = json.loads(report_path.read_text())
    assert report["sent_by_driver"] >= COMMANDS + BAD_INPUTS and counts["pm"] > 0
    assert counts["commands"] == report["sent_by_driver"] + counts["pm"]
    assert report["unaudited"] == 0 and not report["fold_mismatches"] and not report["projection_mismatches"]
