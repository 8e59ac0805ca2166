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


def test_the_run_audits_clean_from_its_ledgers(run_dir):
    # Prepare: the module's run (3 clients x 2 rounds). Execute: the audit CLI.
    path, _ = run_dir
    out = subprocess.run([sys.executable, "-m", "simulations.cli", "audit", str(path),
                          "--format", "json", "--out", str(path / "audit.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((path / "audit.json").read_text())
    assert report["ok"] and report["chain_ok"] and report["ledger_rows"] == 6
    # Each site kept its own ledger, and the server's mirror matched it row by row.
    assert sorted(report["site_ledgers"]) == ["client-0", "client-1", "client-2"]
    assert not [f for f in report["findings"] if f["severity"] == "error"]
    summary = json.loads((path / "summary.json").read_text())
    rounds = [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines()]
    for site in report["sites"]:
        releases = [(c["noise_multiplier"], c["sample_rate"], c["steps"])
                    for r in rounds for c in r["clients"] if c["site"] == site["site"]]
        independent = pld_epsilon(releases, 1e-5)
        assert site["levels"]["sample"]["pld"] == pytest.approx(independent, rel=1e-6)
        assert site["recomputed"] == pytest.approx(summary["epsilon_per_client"][site["site"]])
        assert site["epsilon_by_round"] == sorted(site["epsilon_by_round"])


def test_caps_stop_spent_sites_and_end_the_run(tmp_path):
    """Caps below the schedule's need: sites decline or drop out, the run ends with a reason.

    With sigma calibrated for 4 rounds at eps 3 (PRV), eps after k rounds is about
    1.66, 2.20, 2.63, 3.00. Client 0 (cap 1.0) cannot afford round 1 and declines;
    client 1 (cap 2.4) trains 2 rounds; client 2 (cap 50) is stopped by the global
    cap 2.8 after round 3.
    """
    path = tmp_path / "run"
    out = subprocess.run(
        [*CLI, "train.rounds=4", "simulation.num_clients=3", "strategy.min_train_clients=1",
         "strategy.fraction_evaluate=0", "privacy.site_epsilon_cap=[1.0,2.4,50]",
         "privacy.epsilon_cap=2.8", f"hydra.run.dir={path}"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((path / "summary.json").read_text())
    rounds = [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines()]
    assert summary["stop_reason"] == "global_epsilon_cap", summary
    assert summary["rounds_completed"] == 3
    assert [d["site"] for d in rounds[0]["declined"]] == ["client-0"]
    trained = {r["round"]: sorted(c["site"] for c in r["clients"]) for r in rounds}
    assert trained == {1: ["client-1", "client-2"], 2: ["client-1", "client-2"],
                       3: ["client-2"]}
    caps = {"client-0": 1.0, "client-1": 2.4, "client-2": 2.8}
    audit = subprocess.run([sys.executable, "-m", "simulations.cli", "audit", str(path),
                            "--format", "json", "--out", str(path / "audit.json")],
                           capture_output=True, text=True, timeout=300)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    report = json.loads((path / "audit.json").read_text())
    for site in report["sites"]:
        # Caps hold under the run's accountant (PRV), and under the independent PLD.
        # (RDP is a looser bound than both; it is shown, not enforced.)
        assert site["cap"] == caps[site["site"]]
        assert site["total"]["prv"] <= caps[site["site"]]
        assert site["total"]["pld"] <= caps[site["site"]]
    assert "client-0" not in {s["site"] for s in report["sites"]}  # it never released
