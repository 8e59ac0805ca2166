"""Shared test settings: quiet Ray, and how pytest-xdist spreads the suite.

The suite runs on two workers (``-n 2 --dist loadgroup`` in pyproject.toml).
Each test file stays on one worker (its module fixtures run once), the files
that start Ray share one group (one Ray cluster at a time), and the files that
start a SuperLink and SuperNodes share another, so a deployment test's waits
(process starts, heartbeats) overlap with the rest of the suite.
"""

import os

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

_GROUPS = {
    "test_simulation.py": "ray",
    "test_site_files.py": "ray",
    "test_site_messages.py": "ray",
    "test_flwr_run.py": "ray",
    "test_deploy_local.py": "deploy",
    "test_deploy_failures.py": "deploy",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        group = _GROUPS.get(item.path.name, str(item.path))
        item.add_marker(pytest.mark.xdist_group(group))
