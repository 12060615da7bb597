"""Failpoints: armed only by name, fire on the pass asked for, and refuse a typo."""

from __future__ import annotations

import subprocess
import sys

import pytest

from concordance_provider import failpoints
from concordance_provider.failpoints import CRASH_EXIT_CODE, FailpointError, configure, fail_point


@pytest.fixture(autouse=True)
def disarmed():
    yield
    configure(None)


def test_disarmed_points_do_nothing():
    configure(None)
    for point in failpoints.POINTS:
        fail_point(point)


def test_error_fires_on_every_pass_without_a_hit():
    configure("aggregate.after_append=error")
    for _ in range(3):
        with pytest.raises(FailpointError, match="aggregate.after_append"):
            fail_point("aggregate.after_append")
    fail_point("aggregate.after_state")  # another point stays quiet


def test_error_fires_only_on_the_hit_asked_for():
    configure("deadletter.before_store=error@3")
    fail_point("deadletter.before_store")
    fail_point("deadletter.before_store")
    with pytest.raises(FailpointError):
        fail_point("deadletter.before_store")
    fail_point("deadletter.before_store")


@pytest.mark.parametrize("spec", ["nope=crash", "aggregate.after_append=explode", "aggregate.after_append",
                                  "aggregate.after_append=crash@0", "aggregate.after_append=crash@x"])
def test_a_malformed_spec_is_refused_naming_the_points(spec):
    with pytest.raises(ValueError, match="aggregate.after_append"):
        configure(spec)


def test_crash_exits_at_once_with_its_code():
    code = "from concordance_provider.failpoints import fail_point; fail_point('events.mid_batch'); print('survived')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"CONCORDANCE_FAILPOINTS": "events.mid_batch=crash", "PATH": ""})
    assert done.returncode == CRASH_EXIT_CODE
    assert "survived" not in done.stdout
    assert '"failpoint": "events.mid_batch"' in done.stderr


def test_a_typo_in_the_environment_stops_the_process_with_a_clear_error():
    done = subprocess.run([sys.executable, "-c", "import concordance_provider.failpoints"], capture_output=True,
                          text=True, timeout=60, env={"CONCORDANCE_FAILPOINTS": "aggregate.after_apend=crash"})
    assert done.returncode == 2
    assert "aggregate.after_apend=crash" in done.stderr and "Traceback" not in done.stderr
