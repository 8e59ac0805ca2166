"""A simulation over site files (CSV), through the `fedpriv` CLI and Flower's Ray engine."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from simulations.export import export_sites

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "simulations.cli"]
CLIP, SIGMA = 5.0, 5.0


def _simulate(path, *overrides):
    out = subprocess.run([*CLI, "simulate", *overrides, "output.progress=false",
                          f"hydra.run.dir={path}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads((path / "summary.json").read_text())


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Digits exported as three CSV sites; site 0 gets three bad rows to clean."""
    folder = tmp_path_factory.mktemp("sites")
    paths = export_sites("digits", "csv", 3, folder)
    frame = pd.read_csv(paths[0])
    bad = frame.iloc[:3].copy()
    bad.iloc[0, 0] = np.nan                 # a missing value
    bad.iloc[1, -1] = 42                    # a label outside 0..9
    pd.concat([frame, bad.iloc[:2], frame.iloc[[5]]]).to_csv(paths[0], index=False)  # + a duplicate
    return folder, paths


def _sites_arg(paths):
    # The label set is declared, as it should be: read from a file, it would take in
    # whatever stray labels that file holds (site 0's 42 here).
    return ["dataset.sites=[" + ",".join(str(p) for p in paths) + "]",
            "dataset.labels=[0,1,2,3,4,5,6,7,8,9]"]


def test_federated_normalisation_is_charged_and_stays_at_the_site(sites, tmp_path):
    folder, paths = sites
    # A fourth site whose export lacks the label column: it must not stop the others.
    broken = tmp_path / "broken.csv"
    pd.read_csv(paths[1]).drop(columns="label").to_csv(broken, index=False)
    run = tmp_path / "run"
    summary = _simulate(run, "dataset=csv", *_sites_arg([*paths, broken]),
                        f"dataset.test_path={folder}/test.csv", "train.rounds=2",
                        "dataset.preprocess=[{name: clean},{name: normalize, mode: federated, "
                        f"clip: {CLIP}, noise_multiplier: {SIGMA}}}]")

    # The broken site answered with its error each round; the rounds went on without it.
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(c["site"] for c in r["clients"]) for r in rounds] == [
        ["client-0", "client-1", "client-2"]] * 2
    [declined] = rounds[0]["declined"]
    assert declined["site"] == "client-3" and declined["status"] == "data_error"
    assert str(broken) in declined["reason"] and "label" in declined["reason"]
    assert "client-3 did not train (data_error)" in (run / "fedpriv.log").read_text()

    # The site's data report stays at the site, with what cleaning dropped and why.
    report = json.loads((run / "sites" / "client-0" / "data_report.json").read_text())
    assert report["clean"]["dropped"] == {"nonfinite": 1, "unknown_label": 1, "duplicate": 1}
    sent = (run / "metrics.jsonl").read_text() + (run / "summary.json").read_text()
    assert "class_histogram" not in sent and "feature_min" not in sent

    # The statistics are the pooled ones up to the mechanism's noise (computed here with
    # numpy from the cleaned files: rows clipped to L2 norm CLIP, then pooled).
    clean = pd.concat([pd.read_csv(p) for p in paths]).dropna()
    clean = clean[clean["label"].between(0, 9)].drop_duplicates()
    x = clean.drop(columns="label").to_numpy()
    x = x * np.minimum(1.0, CLIP / np.linalg.norm(x, axis=1, keepdims=True))
    # Each site adds N(0, (SIGMA * sqrt(3))^2) to its scaled sums: std SIGMA*sqrt(3)*CLIP on
    # a feature sum and SIGMA*sqrt(3) on the count; three sites add three of each.
    sum_noise = SIGMA * np.sqrt(3) * CLIP * np.sqrt(3)
    count_noise = SIGMA * np.sqrt(3) * np.sqrt(3)
    pooled = x.mean(axis=0)
    bound = 6 * (sum_noise + count_noise * np.abs(pooled)) / len(x)
    got = np.asarray(summary["federated_statistics"]["mean"])
    assert np.all(np.abs(got - pooled) < bound + 1e-9)

    # The statistics release is in both ledgers and in the site's total, within the target.
    assert summary["epsilon_total_per_client"]["client-0"] > summary["epsilon_per_client"][
        "client-0"]
    assert max(summary["epsilon_total_per_client"].values()) <= 3.0
    audit = subprocess.run([*CLI, "audit", str(run), "--format", "json", "--out",
                            str(run / "audit.json")], capture_output=True, text=True, timeout=300)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    levels = {s["site"]: sorted(s["levels"]) for s in
              json.loads((run / "audit.json").read_text())["sites"]}
    # (client-3 released nothing: its data never loaded.)
    assert levels == {f"client-{i}": ["sample", "statistics"] for i in range(3)}


def test_site_files_reach_the_bundled_accuracy(sites, tmp_path):
    # Same records, same pixel transform ([0, 1] -> [-1, 1]); only the way each client
    # splits off its validation rows differs.
    folder, paths = sites
    bundled = _simulate(tmp_path / "bundled", "train.rounds=5")
    files = _simulate(tmp_path / "files", "dataset=csv", *_sites_arg(paths),
                      f"dataset.test_path={folder}/test.csv", "train.rounds=5",
                      "dataset.preprocess=[{name: clean},{name: normalize, mode: schema, "
                      "mean: [0.5], std: [0.5]}]")
    print(f"accuracy after 5 rounds: bundled {bundled['accuracy']:.4f}, "
          f"CSV sites {files['accuracy']:.4f}")
    assert abs(files["accuracy"] - bundled["accuracy"]) <= 0.05
