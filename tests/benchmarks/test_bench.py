"""`fedpriv bench` runs on a tiny configuration and writes the keys it declares.

Speed is not tested here (a figure depends on the machine and its load); what
is tested is that each section runs, and reports every field the results and
the report promise, with values that can be checked without the code under
test (ratios are positive, ε stays within its target, accuracies are in [0, 1]).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulations.benchmarks import SUITES
from simulations.benchmarks.cli import main as bench_main
from simulations.benchmarks.report import targets, write_report

TINY = SUITES["tiny"]


@pytest.fixture(scope="module")
def dp_overhead() -> dict:
    from simulations.benchmarks.dp_overhead import _worker

    # In process (the CLI starts a fresh worker for it); the memory children still fork.
    return _worker(TINY.dp_overhead)


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> dict:
    from simulations.benchmarks.client_profile import run_profile

    return run_profile(TINY.profile, tmp_path_factory.mktemp("profile"))


def test_dp_overhead_reports_every_model_and_mode(dp_overhead):
    spec = TINY.dp_overhead
    assert set(dp_overhead["models"]) == set(spec.models)
    for model in dp_overhead["models"].values():
        assert model["parameters"] > 0
        assert set(model) == {"parameters", "nonprivate", *spec.modes}
        assert len(model["nonprivate"]["epoch_s"]) == spec.repeats
        for mode in spec.modes:
            row = model[mode]
            assert len(row["epoch_s"]) == spec.repeats
            for key in ("time_ratio", "cpu_time_ratio", "peak_memory_ratio",
                        "training_rss_ratio", "peak_rss_ratio_process"):
                assert math.isfinite(row[key]) and row[key] > 0, key
            # Training memory counts the weights at least: float32, 4 bytes each; the
            # tensors' peak also counts at least one batch of float32 inputs.
            weights_mb = model["parameters"] * 4 / 2**20
            assert row["training_memory_mb"] >= weights_mb - 0.01
            assert row["tensor_memory_mb"] > weights_mb
            assert row["peak_rss_mb"] > row["training_memory_mb"]


def test_profile_times_every_phase_with_and_without_the_worker_cache(profile):
    from simulations.benchmarks.client_profile import PHASES

    phases = {p["phase"]: p for p in profile["phases"]}
    assert set(phases) == {*PHASES, "other"}
    assert sum(p["cpu_s"] for p in phases.values()) == pytest.approx(
        profile["cpu_s_per_call"], abs=0.01 + 0.05 * profile["cpu_s_per_call"])
    assert phases["DP-SGD epoch (Opacus)"]["cpu_s"] > 0  # the handler really trained
    assert [w["variant"] for w in profile["what_if"]] == list(TINY.profile.what_if)
    assert all(w["cpu_s"] > 0 for w in profile["what_if"])
    # As is, the calls after the first take the data from the worker's cache.
    assert profile["cache"]["data"]["hits"] >= TINY.profile.calls
    assert profile["top_self_cpu"]


def test_central_and_nonprivate_accuracy_in_process():
    from clients.data import client_partition, server_test_split
    from simulations.benchmarks.accuracy import _central_dp, _config, _nonprivate, _pooled

    spec = TINY.accuracy_vs_epsilon
    cfg = _config(spec, 3.0)
    pooled = _pooled(cfg)
    # Without preprocessing steps: one client's split of the whole pool, the server's split.
    np.testing.assert_array_equal(pooled[0].x, client_partition(cfg.dataset, 0, 1, 0)[0].x)
    np.testing.assert_array_equal(pooled[1].y, server_test_split(cfg.dataset, 0)[1].y)
    central = _central_dp(spec, 3.0, pooled)
    plain = _nonprivate(spec, pooled)
    assert 0.0 <= central["accuracy"] <= 1.0 and 0.0 <= plain["accuracy"] <= 1.0
    # σ was calibrated for the whole schedule: the ε spent stays within the target.
    assert 0 < central["epsilon"] <= 3.0
    assert central["noise_multiplier"] > 0


def test_report_and_targets_from_in_process_sections(tmp_path, dp_overhead, profile):
    results = {"suite": "tiny", "description": TINY.description, "machine": {},
               "dp_overhead": dp_overhead, "profile": profile}
    write_report(results, tmp_path)
    text = (tmp_path / "results.md").read_text()
    for heading in ("## Targets", "## DP cost", "## Where a client's time goes",
                    "## Simulation throughput", "## Memory growth", "## Accuracy against ε"):
        assert heading in text
    assert (tmp_path / "dp_overhead.png").stat().st_size > 0
    params = dp_overhead["models"]["mlp"]["parameters"]
    for mode in TINY.dp_overhead.modes:  # one row in the DP cost table per mode
        assert f"| mlp | {params} | {mode} |" in text
    rows = {row["name"]: row for row in targets(results)}
    assert len(rows) == 10
    # Not measured in this run: reported as such, not as a pass or a failure.
    assert rows["memory_growth, round ? ÷ round ?"]["met"] is None


def test_cli_refuses_an_unknown_section(tmp_path, capsys):
    with pytest.raises(SystemExit) as ex:
        bench_main(["tiny", "--out", str(tmp_path), "--only", "speed"])
    assert ex.value.code == 2
    assert "unknown section" in capsys.readouterr().err


def test_sizes_narrow_the_simulation_section_only():
    from simulations.benchmarks.cli import with_sizes

    full = SUITES["full"]
    narrowed = with_sizes(full, (100,))
    assert narrowed.simulation.sizes == (100,) and narrowed.simulation.what_if_sizes == (100,)
    assert narrowed.simulation.dataset == full.simulation.dataset
    assert narrowed.accuracy_vs_epsilon == full.accuracy_vs_epsilon
    with pytest.raises(ValueError, match="sizes"):
        with_sizes(full, (0,))


def test_cli_refuses_bad_sizes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_main(["tiny", "--out", str(tmp_path), "--sizes", "ten"])
    assert "--sizes" in capsys.readouterr().err


def _gone(pid):
    """True once ``pid`` has exited (a zombie left to a non-reaping PID 1 counts)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_run_starts_in_a_fresh_directory_and_dies_with_the_benchmark(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    from simulations.benchmarks.throughput import run_monitored

    # A run directory left behind (e.g. by a killed benchmark) would lend its ledgers.
    stale = tmp_path / "run"
    (stale / "sites").mkdir(parents=True)
    (stale / "ledger.sqlite").write_text("an earlier run's spending")
    run = run_monitored([sys.executable, "-c", "pass"], tmp_path / "out.log", 60, fresh=stale)
    assert run.returncode == 0 and not stale.exists()

    # SIGTERM to the benchmark kills the simulation it started (its own session).
    pid_file = tmp_path / "pid"
    child = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
             "time.sleep(120)")
    script = tmp_path / "bench.py"
    script.write_text(
        "import signal, sys\nfrom pathlib import Path\n"
        "from simulations.benchmarks.cli import _exit_on_sigterm\n"
        "from simulations.benchmarks.throughput import run_monitored\n"
        "signal.signal(signal.SIGTERM, _exit_on_sigterm)\n"
        f"run_monitored([sys.executable, '-c', {child!r}], "
        f"Path({str(tmp_path / 'c.log')!r}), 300)\n")
    bench = subprocess.Popen([sys.executable, str(script)],
                             cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = int(pid_file.read_text())
        bench.terminate()
        assert bench.wait(timeout=30) == 128 + 15
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(pid)
    finally:
        bench.kill()
        bench.wait()
