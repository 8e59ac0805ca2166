"""Shared test settings: quiet Ray, and how pytest-xdist spreads the suite.

The suite runs on two workers (``-n 2 --dist loadfile`` in pyproject.toml):
each test file stays on one worker, so its module fixtures run once. Files
that start Ray, and files that start a SuperLink and SuperNodes, hold a lock
per group while they run (:func:`_one_group_member_at_a_time`), so there is
never more than one Ray cluster or one deployment at a time; a deployment
test's waits (process starts, heartbeats) overlap with the rest of the suite.
"""

import fcntl
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

_GROUPS = {
    "test_simulation.py": "ray",  # tests/e2e and tests/benchmarks
    "test_site_files.py": "ray",
    "test_site_messages.py": "ray",
    "test_flwr_run.py": "ray",
    "test_deploy_local.py": "deploy",
    "test_deploy_failures.py": "deploy",
}
_LOCKS = Path(tempfile.gettempdir()) / f"fedpriv-test-locks-{os.getuid()}"


@pytest.fixture(scope="module", autouse=True)
def _one_group_member_at_a_time(request):
    """Hold the module's group lock (if it has a group) from its first test to its last."""
    group = _GROUPS.get(request.path.name)
    if group is None:
        yield
        return
    _LOCKS.mkdir(exist_ok=True)
    with (_LOCKS / f"{group}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
