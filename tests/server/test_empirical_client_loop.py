"""The canary audit of client-level DP (audit=client) in the federated loop, in process.

Runs of the real server loop and ClientApp with privacy=client: 2 clients × 3 rounds on
digits, sigma = 4, C = 1, 1000 canary clients; claimed ε 1.85 at δ = 1e-5 (RDP). One run
is honest; in another a planted bug draws a tenth of the noise while the ledger still
records the calibrated sigma; a third has no audit, to show the canaries change nothing
real. Measured (seed 0): honest ε_lb 0.36 (197 of 300 guesses right), bug ε_lb 4.80
(600 of 600 right; ceiling 5.26), claim 1.85.
"""

import json
import math
import warnings

import numpy as np
import pytest
from safetensors.torch import load_file

import server.strategy
from clients.audit import client_membership
from server.app import compose_config
from server.audit import main as audit_main
from simulations.inprocess import run_in_process

pytestmark = pytest.mark.slow

CLAIM = 1.85  # RDP, 3 rounds at sigma 4, no sampling (every site, every round)
OVERRIDES = ["train.rounds=3", "simulation.num_clients=2", "strategy.min_train_clients=2",
             "strategy.fraction_evaluate=0", "strategy.min_evaluate_clients=0",
             "privacy=client", "privacy.client_noise_multiplier=4.0",
             "privacy.accountant=rdp", "output.progress=false"]
AUDIT = ["audit=client", "audit.num_canaries=1000"]


def _run(path, audit=True, bug_factor=None):
    cfg, resolved = compose_config(OVERRIDES + (AUDIT if audit else []))
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if bug_factor is not None:
            honest_noise = server.strategy.client_level_noise

            def less_noise(cfg):
                # Only the draws shrink: the mechanism's sigma, which the ledger records,
                # is the calibrated one.
                honest = honest_noise(cfg)
                return lambda rnd: (lambda shape, std: honest(rnd)(shape, std * bug_factor))

            mp.setattr(server.strategy, "client_level_noise", less_noise)
        summary = run_in_process(cfg, path, resolved)
    doc = json.loads((path / "audit_empirical.json").read_text()) if audit else None
    return cfg, summary, doc


@pytest.fixture(scope="session")
def client_honest(tmp_path_factory):
    path = tmp_path_factory.mktemp("client-honest") / "run"
    return path, *_run(path)


@pytest.fixture(scope="session")
def client_buggy(tmp_path_factory):
    path = tmp_path_factory.mktemp("client-bug") / "run"
    return path, *_run(path, bug_factor=0.1)


def test_the_run_records_its_canary_clients_and_bound(client_honest):
    path, cfg, summary, doc = client_honest

    assert doc["level"] == "client" and doc["m"] == 1000 and doc["rounds"] == [1, 2, 3]
    assert doc["membership"] == client_membership(cfg.task).astype(int).tolist()
    assert all(map(math.isfinite, doc["scores"]))
    # The canary clients are in all 3 releases, as both sites are: the same epsilon.
    assert doc["claimed_epsilon"] == pytest.approx(summary["epsilon_client_level"])
    assert doc["claimed_epsilon"] == pytest.approx(CLAIM, abs=0.01)
    assert summary["epsilon_empirical_lower_bound"] == doc["epsilon_lb"]
    assert not any("canary" in key for key in load_file(path / "model.safetensors"))


def test_canary_clients_change_neither_the_model_nor_any_charge(client_honest,
                                                                  tmp_path):
    path, _, summary, _ = client_honest

    _, plain, _ = _run(tmp_path / "run", audit=False)

    audited_model, plain_model = (load_file(p / "model.safetensors")
                                  for p in (path, tmp_path / "run"))
    for key, value in plain_model.items():
        np.testing.assert_array_equal(audited_model[key].numpy(), value.numpy())
    assert plain["epsilon_client_level"] == summary["epsilon_client_level"]
    assert plain["ledger"]["rows"] == summary["ledger"]["rows"]
    assert plain["epsilon_empirical_lower_bound"] is None


def test_honest_noise_stays_within_its_claim(client_honest, capsys):
    path, _, _, doc = client_honest

    code = audit_main([str(path), "--format", "json"])
    report = json.loads(capsys.readouterr().out)

    assert doc["epsilon_lb"] <= doc["claimed_epsilon"] <= 2.0
    assert code == 0 and report["ok"]
    assert report["empirical"]["level"] == "client"
    assert report["empirical"]["epsilon_lb"] == pytest.approx(doc["epsilon_lb"])
    assert report["empirical"]["claimed_epsilon"] == pytest.approx(doc["claimed_epsilon"])


def test_a_tenth_of_the_noise_is_caught(client_buggy, capsys):
    path, _, summary, doc = client_buggy

    code = audit_main([str(path)])
    out = capsys.readouterr()

    # The ledger still claims the calibrated epsilon; the canary clients refute it.
    assert doc["claimed_epsilon"] == pytest.approx(CLAIM, abs=0.01)
    assert doc["claimed_epsilon"] < doc["epsilon_lb"]
    assert summary["epsilon_empirical_lower_bound"] == doc["epsilon_lb"]
    assert code == 1
    assert "empirical_lower_bound_exceeds_claim" in out.err
    assert "evidence of a privacy bug" in out.err
    assert "client level: every round's release" in out.out
