"""fedpriv audit's check of a client-level canary audit (audit=client), on files written by
hand: the claim is one release per round composed, recomputed from the ledger's rows."""

import json
import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from privacy.empirical import audit_from_scores
from privacy.empirical_audit import EMPIRICAL_FILE, canary_client_history, check_empirical

DELTA = 1e-5


def _gaussian_epsilon(mu, delta):
    """Exact ε of a μ-GDP mechanism at δ (Balle & Wang 2018, Theorem 8), by root finding."""
    def gap(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) \
            - delta
    return brentq(gap, 0.0, 50.0)


def _write(tmp_path, separated):
    rng = np.random.default_rng(0)
    membership = rng.random(400) < 0.5
    scores = membership.astype(float) if separated else rng.normal(size=400)
    lb = audit_from_scores(scores, membership, delta=DELTA, seed=0).epsilon_lb
    doc = {"level": "client", "epsilon_lb": lb, "delta": DELTA, "significance": 0.05,
           "tiebreak_seed": 0, "sites": [], "membership": membership.astype(int).tolist(),
           "scores": scores.tolist()}
    (tmp_path / EMPIRICAL_FILE).write_text(json.dumps(doc))


def test_a_canary_client_is_charged_once_per_round_without_sampling():
    # Two sites' rows in round 1 (sigma 4), one in round 2 (sigma 3 and 5: the smaller).
    history = canary_client_history([(1, 4.0), (1, 4.0), (2, 5.0), (2, 3.0)])

    assert [(r.noise_multiplier, r.sample_rate, r.steps, r.sampling) for r in history] == \
        [(4.0, 1.0, 1, "none"), (3.0, 1.0, 1, "none")]


def test_the_claim_is_the_rounds_composed(tmp_path):
    # Prepare: 3 rounds at sigma 4, two sites each: a canary client is
    # sqrt(3)/4-GDP, whose exact epsilon the PLD accountant should reproduce.
    _write(tmp_path, separated=False)
    rows = [(r, 4.0) for r in (1, 2, 3) for _ in range(2)]

    # Execute
    summary, findings = check_empirical(tmp_path, [], delta=DELTA, summary={},
                                        client_releases=rows, accountant="pld")

    # Assert
    exact = _gaussian_epsilon(math.sqrt(3) / 4, DELTA)
    assert summary.level == "client" and summary.claimed_site is None
    assert summary.claimed_epsilon == pytest.approx(exact, rel=0.02)
    assert summary.claimed_by_accountant["rdp"] >= summary.claimed_epsilon
    assert summary.epsilon_lb <= summary.claimed_epsilon
    assert not [f for f in findings if f.severity == "error"]


def test_a_bound_above_the_client_level_claim_fails(tmp_path):
    _write(tmp_path, separated=True)

    summary, findings = check_empirical(tmp_path, [], delta=DELTA, summary={},
                                        client_releases=[(1, 4.0), (2, 4.0), (3, 4.0)])

    assert summary.epsilon_lb > summary.claimed_epsilon
    assert ("error", "empirical_lower_bound_exceeds_claim") in \
        {(f.severity, f.code) for f in findings}


def test_no_client_level_release_means_no_claim(tmp_path):
    _write(tmp_path, separated=True)

    summary, findings = check_empirical(tmp_path, [], delta=DELTA, summary={})

    assert summary.claimed_epsilon is None
    [warning] = [f for f in findings if f.severity == "warning"]
    assert "no client-level release in the ledger" in warning.message
