"""Shared test settings: quiet Ray, and one Ray cluster / one deployment at a time.

The suite runs serially by default. Files that start Ray, and files that start
a SuperLink and SuperNodes, hold a lock per group while they run
(:func:`_one_group_member_at_a_time`), so two pytest processes (or
``pytest -n 2 --dist loadfile`` with pytest-xdist) never run two Ray clusters
or two deployments at once. Not the default: under xdist a worker keeps its
last module open until it gets more work, which can leave the other worker
waiting on that module's lock at the end of the suite.
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
