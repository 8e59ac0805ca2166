"""fedpriv audit's check of a run's canary audit (audit_empirical.json), on files written
by hand: the bound is recomputed from the scores, held against the ledger's claim,
and a bound above the claim fails the audit."""

import json

import numpy as np
import pytest

from privacy.empirical import audit_from_scores, ceiling
from privacy.empirical_audit import EMPIRICAL_FILE, check_empirical
from privacy.report import SiteAudit

DELTA = 1e-5


def _site(name, eps):
    return SiteAudit(site=name, releases=3,
                     levels={"sample": {"rdp": eps + 0.1, "prv": eps, "pld": eps - 0.01}},
                     total={"rdp": eps + 0.1, "prv": eps, "pld": eps - 0.01}, accountant="prv",
                     reported=eps, recomputed=eps, cap=None, spent=eps, remaining=None,
                     num_records=600, noise_generators=["torch"])


SITES = [_site("client-0", 1.5), _site("client-1", 1.9), _site("other", 7.0)]


def _write(tmp_path, separated, *, recorded=None):
    """200 canaries at client-0 and client-1 ("other" has none); perfectly separated
    scores or pure noise."""
    rng = np.random.default_rng(0)
    membership = rng.random(200) < 0.5
    scores = membership.astype(float) if separated else rng.normal(size=200)
    lb = audit_from_scores(scores, membership, delta=DELTA, seed=0).epsilon_lb
    doc = {"level": "sample", "epsilon_lb": lb if recorded is None else recorded,
           "delta": DELTA, "significance": 0.05, "tiebreak_seed": 0,
           "sites": [{"site": "client-0", "canaries": 100}, {"site": "client-1", "canaries": 100},
                     {"site": "other", "canaries": 0}],
           "membership": membership.astype(int).tolist(), "scores": scores.tolist()}
    (tmp_path / EMPIRICAL_FILE).write_text(json.dumps(doc))
    return lb


def _codes(findings):
    return {(f.severity, f.code) for f in findings}


def test_a_bound_above_the_claim_fails_naming_the_reason(tmp_path):
    # Prepare: scores that tell members apart (the bound is then near the ceiling, 3.70
    # for m = 200), above the 1.9 claimed.
    _write(tmp_path, separated=True)

    # Execute
    summary, findings = check_empirical(tmp_path, SITES, delta=DELTA, summary={})

    # Assert: the claim is the larger of the two sites with canaries, not "other".
    assert summary.ceiling == pytest.approx(ceiling(200, delta=DELTA, significance=0.05))
    assert 3.0 < summary.epsilon_lb <= summary.ceiling
    assert (summary.claimed_epsilon, summary.claimed_site) == (1.9, "client-1")
    assert summary.claimed_by_accountant == {"pld": 1.89, "prv": 1.9, "rdp": 2.0}
    [error] = [f for f in findings if f.severity == "error"]
    assert error.code == "empirical_lower_bound_exceeds_claim" and error.site == "client-1"
    assert "evidence of a privacy bug (noise too small" in error.message


def test_a_bound_below_the_claim_passes_and_states_the_ceiling(tmp_path):
    _write(tmp_path, separated=False)

    summary, findings = check_empirical(tmp_path, SITES, delta=DELTA, summary={})

    assert summary.epsilon_lb < 1.9
    assert _codes(findings) == {("info", "empirical_ceiling")}
    assert f"at most ε_lb = {summary.ceiling:.3f}" in findings[0].message
    assert "cannot be refuted by this run" in findings[0].message


def test_a_recorded_bound_that_the_scores_do_not_give_is_an_error(tmp_path):
    _write(tmp_path, separated=False, recorded=0.5)

    _, findings = check_empirical(tmp_path, SITES, delta=DELTA, summary={})

    assert ("error", "empirical_mismatch") in _codes(findings)


def test_another_delta_recomputes_the_bound_there(tmp_path):
    # Prepare: the run recorded its bound at 1e-5.
    at_run_delta = _write(tmp_path, separated=True)

    # Execute
    summary, findings = check_empirical(tmp_path, SITES, delta=1e-3, summary={})

    # Assert: a larger delta explains more right guesses, so a lower bound; the recorded
    # one is still checked at its own delta.
    assert summary.delta == 1e-3 and summary.epsilon_lb < at_run_delta
    assert ("error", "empirical_mismatch") not in _codes(findings)


def test_a_reported_bound_without_its_file_is_an_error(tmp_path):
    summary, findings = check_empirical(tmp_path, SITES, delta=DELTA,
                                        summary={"epsilon_empirical_lower_bound": 0.4})
    assert summary is None
    assert _codes(findings) == {("error", "empirical_audit_missing")}


def test_a_run_without_canaries_has_nothing_to_check(tmp_path):
    assert check_empirical(tmp_path, SITES, delta=DELTA,
                           summary={"epsilon_empirical_lower_bound": None}) == (None, [])
