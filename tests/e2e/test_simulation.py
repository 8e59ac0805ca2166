"""A real Flower simulation (Ray backend) through the `fedpriv` CLI."""

import json
import subprocess
import sys
import time

import pytest

from privacy import epsilon as opacus_epsilon

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "simulations.cli", "simulate"]


def pld_epsilon(releases, delta):
    """Independent accountant: Google's dp-accounting PLD."""
    import dp_accounting

    acc = dp_accounting.pld.PLDAccountant()
    for sigma, q, steps in releases:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                    steps)
    return acc.get_epsilon(delta)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "run"
    out = subprocess.run(
        [*CLI, "train.rounds=2", "simulation.num_clients=3", "strategy.min_train_clients=3",
         "output.tensorboard=true", f"hydra.run.dir={path}"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return path, out


def test_console_shows_round_lines_not_the_log_flood(run_dir):
    _, out = run_dir
    round_lines = [ln for ln in out.stdout.splitlines() if ln.startswith("round ")]
    assert len(round_lines) == 2
    assert all("accuracy" in ln and "eps_max" in ln for ln in round_lines)
    assert "INFO" not in out.stdout + out.stderr


def test_run_directory_contract(run_dir):
    path, _ = run_dir
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors",
                 "fedpriv.log"):
        assert (path / name).is_file(), name
    assert any((path / "tensorboard").iterdir())
    log_text = (path / "fedpriv.log").read_text()
    assert "Registered 3 nodes" in log_text  # Flower's own log went to the file
    assert "round 2: central" in log_text  # and fedpriv's own per-round record

    rounds = [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert {"accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc_ovr",
                "loss", "confusion_matrix"} <= set(r["central"])
        assert sorted(c["client"] for c in r["clients"]) == [0, 1, 2]
        for c in r["clients"]:
            assert {"num_examples", "epsilon", "noise_multiplier", "sample_rate",
                    "steps"} <= set(c)
        assert r["wall_seconds"] > 0

    summary = json.loads((path / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["num_clients"] == 3
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert summary["delta"] == 1e-5 and summary["accountant"] == "opacus-prv"  # the default
    last_eps = max(c["epsilon"] for c in rounds[-1]["clients"])
    assert summary["epsilon_sample_level_max"] >= last_eps > 0
    assert summary["epsilon_sample_level_max"] <= 3.0

    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    assert weights and not any(k.startswith("_module.") for k in weights)


def test_epsilon_is_cumulative_and_not_under_reported(run_dir):
    path, _ = run_dir
    rounds = [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines()]
    releases: dict[int, list] = {}
    previous: dict[int, float] = {}
    for r in rounds:
        for c in r["clients"]:
            cid = c["client"]
            assert c["epsilon"] >= previous.get(cid, 0.0)  # never decreases
            previous[cid] = c["epsilon"]
            releases.setdefault(cid, []).append((c["noise_multiplier"], c["sample_rate"],
                                                 c["steps"]))
            independent = pld_epsilon(releases[cid], 1e-5)
            assert c["epsilon"] >= independent - 1e-9
            # ... and is the PRV value of the same releases (the default accountant) ...
            prv = opacus_epsilon(history=releases[cid], delta=1e-5, accountant="prv")
            assert c["epsilon"] == pytest.approx(prv, rel=1e-6)
            # ... which RDP, the looser bound, never undercuts.
            assert c["epsilon"] <= opacus_epsilon(history=releases[cid], delta=1e-5) + 1e-9


def test_a_raising_client_fails_the_run_fast(tmp_path):
    # An unreachable budget makes every client's calibration raise inside the ClientApp.
    start = time.monotonic()
    out = subprocess.run(
        [*CLI, "train.rounds=2", "simulation.num_clients=2", "privacy.target_epsilon=0.01",
         f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=300,
    )
    elapsed = time.monotonic() - start
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "target_epsilon=0.01: unreachable" in text  # the client's own error ...
    assert "Traceback" in text and "calibrate_noise_multiplier" in text  # ... and traceback
    assert elapsed < 120, f"a failing client took {elapsed:.0f}s to end the run"
