"""The fault suite, as CI runs it: kills and NATS restarts under load lose and double nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_fault_suite_loses_and_doubles_nothing(example_components):
    done = subprocess.run(
        [sys.executable, "-m", "faults.suite", "--commands", "800", "--kills", "3", "--nats-restarts", "2",
         "--budget", "400"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    print(line)
    assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    assert line.startswith("faults: ") and "lost 0, duplicated 0" in line
    assert ", 3 kills, 2 NATS restarts, 9 bad inputs," in line
