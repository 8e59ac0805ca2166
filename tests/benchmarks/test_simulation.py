"""`fedpriv bench`'s simulation section: fedpriv and the naive baseline on Ray, tiny.

Named like tests/e2e/test_simulation.py on purpose: tests/conftest.py puts the
files that start Ray in one pytest-xdist group by file name, so this one never
runs Ray beside another Ray test.
"""

from __future__ import annotations

import json

import pytest

from simulations.benchmarks import SECTIONS, SUITES
from simulations.benchmarks.cli import main as bench_main

TINY = SUITES["tiny"]
pytestmark = pytest.mark.slow


def test_simulation_section_and_the_run_summaries(tmp_path, monkeypatch):
    """One fedpriv and one naive Ray simulation (2 clients, 2 rounds) through the CLI.

    The memory-growth and federated-accuracy summaries are then read from the
    same fedpriv run, so that the test starts Ray only twice.
    """
    from simulations.benchmarks import throughput
    from simulations.benchmarks.accuracy import federated_result
    from simulations.benchmarks.memory import summarise_memory

    runs = []
    original = throughput.summarise_run

    def keep(run, round_s, sampled):
        runs.append(run)
        return original(run, round_s, sampled)

    monkeypatch.setattr(throughput, "summarise_run", keep)
    code = bench_main(["tiny", "--out", str(tmp_path), "--only", "simulation"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert code == 0, results["simulation"].get("error")
    assert set(SECTIONS) <= set(results["config"]) and results["targets"]
    assert (tmp_path / "results.md").is_file() and (tmp_path / "simulation.png").is_file()
    sim = results["simulation"]
    size = sim["sizes"]["2"]
    rounds = TINY.simulation.rounds
    for kind in ("fedpriv", "naive"):
        run = size[kind]
        assert len(run["round_s"]) == rounds
        assert run["updates_per_s"] > 0 and run["cpu_s_per_update"] > 0
        assert run["workers"] >= 1 and run["peak_rss_per_worker_mb"] > 0
        assert run["peak_rss_total_mb"] >= run["peak_rss_workers_sum_mb"]
    assert size["speedup_vs_naive"] > 0
    assert sim["fedpriv_peak_rss_per_worker_mb"] == size["fedpriv"]["peak_rss_per_worker_mb"]

    fedpriv_run = next(r for r in runs if r.log.name == "fedpriv.out")
    memory = summarise_memory(fedpriv_run, early=1, late=rounds)
    assert memory["ratio"] > 0
    assert set(memory["by_group"]) >= {"client workers", "server (simulation process)"}
    fed = federated_result(fedpriv_run.log.parent / "run")
    assert 0 <= fed["accuracy"] <= 1 and 0 < fed["epsilon"] <= 3.0
    assert fed["rounds_completed"] == rounds
