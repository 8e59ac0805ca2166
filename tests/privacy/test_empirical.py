"""Empirical audit statistics: the one-run bound is valid on an exactly ε-DP mechanism,
its ceiling and p-value match hand computations, and the Gaussian-DP conversion
matches Google's dp-accounting (an independent implementation)."""

import json
import math

import numpy as np
import pytest
from scipy import special, stats

from privacy.empirical import (
    DEFAULT_GUESS_FRACTIONS,
    audit_from_scores,
    ceiling,
    clopper_pearson,
    gdp_epsilon,
    gdp_mu,
    guess_counts,
    one_run_epsilon_lb,
    one_run_p_value,
)

SIG = 0.05


def randomized_response(eps, *, repeats, m, seed):
    """Membership bits and the bits an exactly ε-DP randomized response reports."""
    rng = np.random.default_rng(seed)
    bits = rng.random((repeats, m)) < 0.5
    truthful = rng.random((repeats, m)) < math.exp(eps) / (1 + math.exp(eps))
    return bits, np.where(truthful, bits, ~bits).astype(float)


def test_bound_valid_on_exact_randomized_response():
    # Prepare: 400 runs of an exactly 1-DP mechanism. One guessing rule, so the level
    # is not diluted by Bonferroni, and 90% guessed, so that (almost) every guess
    # follows a reported bit: right guesses are then Binomial(900, e/(1+e)) and a
    # too-high bound would show.
    eps, repeats = 1.0, 400
    bits, reported = randomized_response(eps, repeats=repeats, m=1000, seed=1)

    # Execute
    lbs = np.array([audit_from_scores(reported[i], bits[i], delta=0.0, significance=SIG,
                                      guess_fractions=(0.9,), seed=i).epsilon_lb
                    for i in range(repeats)])

    # Assert: ε_lb > ε at most about SIG of the time (binomial tolerance), and the
    # bound is not empty either (a bound stuck at 0 would pass the first check).
    assert np.mean(lbs > eps) <= SIG + 3 * math.sqrt(SIG * (1 - SIG) / repeats)
    assert np.median(lbs) > 0.5 * eps


def test_bound_valid_with_delta_term():
    # Prepare: right guesses of an exactly 1-DP mechanism are Binomial(r, e^ε/(1+e^ε)).
    eps, repeats, r = 1.0, 200, 400
    correct = np.random.default_rng(2).binomial(r, special.expit(eps), size=repeats)

    # Execute
    lbs = np.array([one_run_epsilon_lb(r, int(v), num_canaries=1000, delta=1e-5,
                                       significance=SIG) for v in correct])

    # Assert
    assert np.mean(lbs > eps) <= SIG + 3 * math.sqrt(SIG * (1 - SIG) / repeats)


def test_bound_informative_when_leak_is_large():
    # Prepare: a 5-DP randomized response, audited with the default rules.
    bits, reported = randomized_response(5.0, repeats=5, m=1000, seed=3)

    # Execute
    lbs = [audit_from_scores(reported[i], bits[i], delta=1e-5).epsilon_lb for i in range(5)]

    # Assert: clearly informative, and never above the truth.
    assert min(lbs) > 3.0
    assert max(lbs) <= 5.0


def test_p_value_matches_corollary_by_hand():
    # m = 4, r = v = 2, q = 3/4 (ε = ln 3), δ = 0.01:
    # P[Bin(2, 3/4) >= 2] = 9/16; α = max(P[B=1]/1, P[0<=B<2]/2) = max(6/16, 7/32) = 6/16;
    # p = 9/16 + 2·4·0.01·6/16 = 0.5925.
    p = one_run_p_value(num_canaries=4, num_guesses=2, num_correct=2, epsilon=math.log(3),
                        delta=0.01)
    assert p == pytest.approx(0.5925, rel=1e-12)


def test_ceiling_at_1000_canaries_delta_zero_by_hand():
    # Prepare: all r guesses right and δ = 0: P[Bin(r, q) >= r] = q^r, so the bound at
    # level SIG/T solves q^r = SIG/T; the largest r tried wins.
    m = 1000
    tries = len(DEFAULT_GUESS_FRACTIONS)
    r = 2 * (int(max(DEFAULT_GUESS_FRACTIONS) * m) // 2)
    q = (SIG / tries) ** (1 / r)
    by_hand = math.log(q / (1 - q))

    # Execute
    top = ceiling(m, delta=0.0, significance=SIG)

    # Assert: equal to the hand value, and scipy's binomial tail there is the level.
    assert top == pytest.approx(by_hand, rel=1e-9)
    assert stats.binom.sf(r - 1, r, special.expit(top)) == pytest.approx(SIG / tries, rel=1e-6)
    assert 5.0 < top < 5.5  # "about 5" for m = 1000


def test_ceiling_with_delta_solves_the_corollary():
    # Prepare: the corollary's p-value for v = r, written with binomial CDFs (not the pmf
    # sums of the code under test).
    m, delta = 1000, 1e-5
    tries = len(DEFAULT_GUESS_FRACTIONS)
    r = 2 * (int(max(DEFAULT_GUESS_FRACTIONS) * m) // 2)

    def p_by_cdf(eps):
        q = special.expit(eps)
        i = np.arange(1, r + 1)
        alpha = np.max((stats.binom.cdf(r - 1, r, q) - stats.binom.cdf(r - 1 - i, r, q)) / i)
        return stats.binom.sf(r - 1, r, q) + 2 * m * delta * alpha

    # Execute
    top = ceiling(m, delta=delta, significance=SIG)

    # Assert: the p-value crosses the level there, and the δ term costs a little.
    assert p_by_cdf(top) == pytest.approx(SIG / tries, rel=1e-5)
    assert p_by_cdf(top - 0.01) < SIG / tries < p_by_cdf(top + 0.01)
    assert 5.0 < top < ceiling(m, delta=0.0, significance=SIG)


def test_perfect_separation_reaches_the_ceiling():
    # Prepare: 500 of 1000 canaries in, and scores that separate them exactly.
    rng = np.random.default_rng(4)
    membership = rng.permutation(np.repeat([1, 0], 500))
    scores = membership + 0.01 * rng.random(1000)

    # Execute
    audit = audit_from_scores(scores, membership, delta=1e-5)

    # Assert
    assert audit.correct == audit.guesses == 950
    assert audit.epsilon_lb == pytest.approx(audit.ceiling, rel=1e-9)


def test_ties_are_not_broken_by_position():
    # Prepare: no information in the scores, members listed first. Breaking ties by
    # position would guess every canary right.
    membership = np.repeat([1, 0], 500)

    # Execute
    audit = audit_from_scores(np.zeros(1000), membership, delta=0.0)

    # Assert
    assert audit.epsilon_lb < 0.5


def test_gdp_epsilon_matches_dp_accounting_pld():
    # A Gaussian mechanism with sensitivity 1 and noise 1/μ is exactly μ-GDP.
    from dp_accounting.pld import privacy_loss_distribution as pld

    for mu, delta in [(0.5, 1e-5), (1.0, 1e-3), (2.0, 1e-5)]:
        expected = pld.from_gaussian_mechanism(
            standard_deviation=1 / mu, sensitivity=1.0,
            value_discretization_interval=1e-3).get_epsilon_for_delta(delta)
        assert gdp_epsilon(mu, delta) == pytest.approx(expected, abs=2e-3)


def test_gdp_epsilon_edges():
    # μ = 0.1 already has δ(0) = 2Φ(0.05) - 1 ≈ 0.04 < 0.05: ε = 0 suffices.
    assert 2 * stats.norm.cdf(0.05) - 1 < 0.05
    assert gdp_epsilon(0.1, 0.05) == 0.0
    assert gdp_epsilon(0.0, 1e-5) == 0.0
    assert gdp_epsilon(1.0, 0.0) == math.inf


def test_gdp_mu_from_rates_by_hand():
    # FPR = 1 - Φ(1.2), TPR = 1 - Φ(-0.3): μ = 1.2 - (-0.3) = 1.5.
    assert gdp_mu(stats.norm.sf(-0.3), stats.norm.sf(1.2)) == pytest.approx(1.5, rel=1e-9)
    assert gdp_mu(0.2, 0.3) == 0.0  # worse than guessing: floored


def test_clopper_pearson_against_scipy_binomtest():
    # scipy's exact interval inverts the binomial tails by root finding: another path.
    for k, n in [(7, 20), (0, 30), (30, 30), (480, 500)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="exact")
        assert clopper_pearson(k, n, confidence=0.9) == pytest.approx((ci.low, ci.high),
                                                                      abs=1e-9)
    assert clopper_pearson(0, 0, confidence=0.9) == (0.0, 1.0)


def test_audit_reports_rule_and_json():
    # Prepare
    bits, reported = randomized_response(3.0, repeats=1, m=400, seed=5)

    # Execute
    audit = audit_from_scores(reported[0], bits[0], delta=1e-5)
    out = json.loads(json.dumps(audit.to_json()))

    # Assert: the reported rule is one of the tries and carries the bound.
    assert audit.bonferroni_tries == len(DEFAULT_GUESS_FRACTIONS) == len(out["tries"])
    assert (audit.k_plus, audit.k_minus) in guess_counts(400, DEFAULT_GUESS_FRACTIONS)
    assert audit.epsilon_lb == max(t["epsilon_lb"] for t in out["tries"])
    assert out["epsilon_lb"] == audit.epsilon_lb and out["members"] == int(bits[0].sum())
    assert 0 < audit.gdp_epsilon_estimate


@pytest.mark.parametrize("kwargs, match", [
    (dict(scores=np.zeros(5), membership=np.zeros(4)), "shape"),
    (dict(scores=np.zeros(4), membership=[0, 1, 2, 0]), "membership contains .*2"),
    (dict(scores=[0, 1, np.nan, 0], membership=[0, 1, 1, 0]), "not finite"),
    (dict(scores=np.zeros(40), membership=np.zeros(40), significance=1.0), "significance=1.0"),
    (dict(scores=np.zeros(40), membership=np.zeros(40), delta=1.0), "delta=1.0"),
    (dict(scores=np.zeros(40), membership=np.zeros(40), guess_fractions=(0.0,)), "0.0"),
    (dict(scores=np.zeros(40), membership=np.zeros(40), guess_fractions=(0.5, 0.51)),
     "same guesses"),
])
def test_audit_rejects_bad_input(kwargs, match):
    kwargs.setdefault("delta", 1e-5)
    with pytest.raises(ValueError, match=match):
        audit_from_scores(**kwargs)


def test_bound_rejects_impossible_counts():
    with pytest.raises(ValueError, match="num_correct=5, num_guesses=4"):
        one_run_epsilon_lb(4, 5, num_canaries=10, delta=0.0, significance=SIG)
