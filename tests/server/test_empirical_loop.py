"""The canary audit in the federated loop (audit=sample), in process (no Ray).

Two runs of the real server loop and ClientApp, claimed ε ≤ 2 at δ = 1e-5 (RDP):
2 clients × 3 rounds × 2 local epochs of DP-SGD on digits, 500 canaries. One is
honest; in the other a planted bug adds a tenth of the noise while Opacus'
accountant and the ledger still see the calibrated σ, as a real bug would.
Measured (seed 0): honest ε_lb 0.42, bug ε_lb 4.14 (300 of 300 guesses right;
ceiling 4.60), claim 2.00.
"""

import json
import math
import warnings

import pytest
from safetensors.torch import load_file

from clients.audit import site_canaries
from clients.noise import _InPlaceNoise
from server.app import compose_config
from server.audit import main as audit_main
from simulations.inprocess import run_in_process

pytestmark = pytest.mark.slow

CLAIM = 2.0
OVERRIDES = ["train.rounds=3", "train.local_epochs=2", "simulation.num_clients=2",
             "strategy.min_train_clients=2", "strategy.fraction_evaluate=0",
             "strategy.min_evaluate_clients=0", "privacy.accountant=rdp",
             f"privacy.target_epsilon={CLAIM}", "output.progress=false",
             "audit=sample", "audit.num_canaries=500"]


def _run(path, bug_factor=None):
    cfg, resolved = compose_config(OVERRIDES)
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if bug_factor is not None:
            honest_draw = _InPlaceNoise._draw

            def less_noise(self, piece, std):
                # Only the noise drawn shrinks: the optimizer's noise_multiplier, which
                # Opacus' accountant reads after each step, is the calibrated one.
                return honest_draw(self, piece, std * bug_factor)

            # fedpriv's noise step (clients/noise.py) draws every DP-SGD noise value.
            mp.setattr(_InPlaceNoise, "_draw", less_noise)
        summary = run_in_process(cfg, path, resolved)
    return cfg, summary, json.loads((path / "audit_empirical.json").read_text())


# Session scope: each run happens once per worker, in whatever order pytest-xdist hands
# out the tests (a module fixture is built again when another file's tests come between).
@pytest.fixture(scope="session")
def honest(tmp_path_factory):
    path = tmp_path_factory.mktemp("honest") / "run"
    return path, *_run(path)


@pytest.fixture(scope="session")
def buggy(tmp_path_factory):
    path = tmp_path_factory.mktemp("bug") / "run"
    return path, *_run(path, bug_factor=0.1)


def test_the_run_records_its_canaries_and_bound(honest):
    path, cfg, summary, doc = honest

    # The secret bits are those each site derived for itself, in canary order.
    for site in doc["sites"]:
        mine = site_canaries(cfg.task, site["partition"], 2)
        assert [doc["membership"][j] for j in mine.ids] == mine.membership.astype(int).tolist()
        assert site["included"] == mine.included and site["rounds"] == [1, 2, 3]
    assert len(doc["scores"]) == doc["m"] == 500 and all(map(math.isfinite, doc["scores"]))
    for key in ("guesses", "correct", "epsilon_lb", "ceiling", "gdp_epsilon_estimate"):
        assert doc[key] is not None
    # The claim is the larger of the two sites' cumulative sample-level epsilons.
    assert doc["claimed_epsilon"] == max(summary["epsilon_per_client"].values())
    assert summary["epsilon_empirical_lower_bound"] == doc["epsilon_lb"]


def test_sites_charge_their_canaries_and_send_only_the_real_model(honest):
    path, cfg, summary, doc = honest
    first = json.loads((path / "metrics.jsonl").read_text().splitlines()[0])

    # Each site's Poisson rate counts its included canaries: 1 / ceil((n + k) / 128).
    included = {s["site"]: s["included"] for s in doc["sites"]}
    for c in first["clients"]:
        n = c["num_examples"] + included[c["site"]]
        assert c["sample_rate"] == pytest.approx(1 / math.ceil(n / 128))
    # The global model has no canary block.
    assert not any("canary" in key for key in load_file(path / "model.safetensors"))


def test_honest_noise_stays_within_its_claim(honest, capsys):
    path, _, _, doc = honest

    code = audit_main([str(path), "--format", "json"])
    report = json.loads(capsys.readouterr().out)

    assert doc["claimed_epsilon"] <= CLAIM
    assert doc["epsilon_lb"] <= doc["claimed_epsilon"]
    assert code == 0 and report["ok"]
    assert report["empirical"]["epsilon_lb"] == pytest.approx(doc["epsilon_lb"])
    assert report["empirical"]["claimed_epsilon"] == pytest.approx(doc["claimed_epsilon"])


def test_a_tenth_of_the_noise_is_caught(buggy, capsys):
    path, _, summary, doc = buggy

    code = audit_main([str(path)])
    out = capsys.readouterr()

    # The ledger still claims the calibrated epsilon; the canaries refute it.
    assert doc["claimed_epsilon"] <= CLAIM < doc["epsilon_lb"]
    assert summary["epsilon_empirical_lower_bound"] == doc["epsilon_lb"]
    assert code == 1
    assert "empirical_lower_bound_exceeds_claim" in out.err
    assert "evidence of a privacy bug" in out.err and "noise too small" in out.err
    assert "could show at most" in out.out  # the ceiling, in the report
