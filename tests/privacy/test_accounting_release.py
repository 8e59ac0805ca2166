"""Accounting of GaussianRelease histories (sampling methods, neighbouring relations)
and the budget check built on it.

Expected values come from outside the code under test: Opacus' own test values,
the exact (ε, δ) curve of the Gaussian mechanism (Balle & Wang 2018, Thm. 8),
worked out here with scipy, and Opacus' and dp-accounting's accountants used
directly.
"""

import math
from typing import Any

import dp_accounting
import pytest
from opacus.accountants import RDPAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from privacy import GaussianRelease, UnsupportedAccounting, epsilon, epsilon_all
from privacy.budget import check_budget, effective_cap

DELTA = 1e-5
# Opacus' tests: σ 1.5, q 0.04, 90 epochs (2250 steps), δ 1e-5.
PUBLISHED = [(1.5, 0.04, 2250)]
OPACUS_RDP = 7.32911117143        # opacus/tests/accountants_test.py, test_rdp_accountant
OPACUS_PRV = 6.777395712150674    # opacus/tests/accountants_test.py, test_prv_accountant


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """ε at δ of a Gaussian mechanism with sensitivity/σ = mu (Balle & Wang 2018, Thm. 8).

    n compositions of noise multiplier σ at sensitivity Δ have mu = Δ·√n/σ.
    """
    def gap(eps: float) -> float:
        return (norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu)
                - delta)
    return brentq(gap, 0.0, 200.0)


# --- published values -------------------------------------------------------------------------

def test_rdp_matches_opacus_published_value():
    assert epsilon(history=PUBLISHED, delta=DELTA, accountant="rdp") == \
        pytest.approx(OPACUS_RDP, rel=1e-6)


def test_prv_matches_opacus_published_value():
    # Opacus steps its PRV accountant 2250 times; one (σ, q, 2250) entry gives a
    # slightly different discretisation, hence the 0.01 tolerance.
    assert epsilon(history=PUBLISHED, delta=DELTA, accountant="prv") == \
        pytest.approx(OPACUS_PRV, abs=0.01)


def test_epsilon_all_gives_all_three_accountants():
    # Execute
    eps = epsilon_all(history=PUBLISHED, delta=DELTA)
    # Assert
    assert set(eps) == {"rdp", "prv", "pld"}
    assert eps["rdp"] == pytest.approx(OPACUS_RDP, rel=1e-6)
    assert eps["prv"] == pytest.approx(OPACUS_PRV, abs=0.01)
    assert eps["pld"] == pytest.approx(OPACUS_PRV, abs=0.05)
    # RDP's conversion to (ε, δ) is loose; the tight accountants sit below it.
    assert eps["pld"] < eps["rdp"] and eps["prv"] < eps["rdp"]


# --- sampling methods without a Poisson guarantee ---------------------------------------------

SIGMA, STEPS = 2.0, 10  # mu = √10 / 2 ≈ 1.58: ε ≈ 7.5 at δ 1e-5


# Opacus' PRV takes log(1 - q) at q = 1 and warns; its result is still checked below.
PRV_AT_RATE_ONE = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


@PRV_AT_RATE_ONE
@pytest.mark.parametrize("sampling", ["shuffle", "none"])
@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
def test_unamplified_sampling_is_accounted_at_rate_one(sampling, accountant):
    # Prepare
    release = GaussianRelease(SIGMA, 0.1, STEPS, sampling=sampling)
    exact = exact_gaussian_epsilon(math.sqrt(STEPS) / SIGMA, DELTA)
    # Execute
    eps = epsilon(history=[release], delta=DELTA, accountant=accountant)
    eps_q1 = epsilon(history=[(SIGMA, 1.0, STEPS)], delta=DELTA, accountant=accountant)
    eps_poisson = epsilon(history=[(SIGMA, 0.1, STEPS)], delta=DELTA, accountant=accountant)
    # Assert
    assert eps == eps_q1
    assert eps > eps_poisson
    assert eps >= exact * (1 - 1e-6)  # never below the exact value: an over-count at most
    if accountant != "rdp":
        assert eps == pytest.approx(exact, rel=0.01)


def test_shuffled_release_is_accounted_like_full_batch_with_dp_accounting():
    # Prepare: dp-accounting, used directly, on a plain (unsampled) Gaussian.
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(SIGMA), STEPS)
    expected = acc.get_epsilon(DELTA)
    # Execute
    eps = epsilon(history=[GaussianRelease(SIGMA, 0.25, STEPS, sampling="shuffle")],
                  delta=DELTA, accountant="pld")
    # Assert
    assert eps == pytest.approx(expected, rel=1e-9)


# --- neighbouring relations -------------------------------------------------------------------

REPLACE_SIGMA = 4.0  # replace-one doubles the sensitivity: mu = 2·√10/4 ≈ 1.58


@PRV_AT_RATE_ONE
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_replace_one_without_sampling_is_add_remove_at_half_sigma(accountant):
    # Prepare
    replace = GaussianRelease(REPLACE_SIGMA, 1.0, STEPS, relation="replace_one")
    exact = exact_gaussian_epsilon(2 * math.sqrt(STEPS) / REPLACE_SIGMA, DELTA)
    # Execute
    eps = epsilon(history=[replace], delta=DELTA, accountant=accountant)
    eps_half = epsilon(history=[(REPLACE_SIGMA / 2, 1.0, STEPS)], delta=DELTA,
                       accountant=accountant)
    # Assert
    assert eps == eps_half
    assert eps >= exact * (1 - 1e-6)


def test_replace_one_without_sampling_with_pld_is_the_doubled_sensitivity_gaussian():
    # Prepare
    exact = exact_gaussian_epsilon(2 * math.sqrt(STEPS) / REPLACE_SIGMA, DELTA)
    # Execute
    eps = epsilon(history=[GaussianRelease(REPLACE_SIGMA, 1.0, STEPS, relation="replace_one")],
                  delta=DELTA, accountant="pld")
    # Assert
    assert math.isfinite(eps)
    assert eps == pytest.approx(exact, rel=0.01)
    assert eps >= exact * (1 - 1e-6)


def test_shuffled_replace_one_is_analysable_as_full_batch():
    # Prepare: shuffling is accounted at q = 1, where replace-one reduces to add/remove.
    shuffled = GaussianRelease(REPLACE_SIGMA, 0.3, STEPS, sampling="shuffle",
                               relation="replace_one")
    # Execute
    eps = epsilon(history=[shuffled], delta=DELTA, accountant="rdp")
    eps_half = epsilon(history=[(REPLACE_SIGMA / 2, 1.0, STEPS)], delta=DELTA, accountant="rdp")
    # Assert
    assert eps == eps_half


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_poisson_replace_one_is_refused_by_opacus_accountants(accountant):
    release = GaussianRelease(1.0, 0.1, STEPS, relation="replace_one")
    with pytest.raises(UnsupportedAccounting, match="pld"):
        epsilon(history=[release], delta=DELTA, accountant=accountant)


def test_poisson_replace_one_is_left_to_pld_by_epsilon_all():
    # Prepare: the add/remove ε of the same release, by dp-accounting directly;
    # replace-one is the weaker guarantee, so its ε must be larger.
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)),
                STEPS)
    add_remove = acc.get_epsilon(DELTA)
    # Execute
    eps = epsilon_all(history=[GaussianRelease(1.0, 0.1, STEPS, relation="replace_one")],
                      delta=DELTA)
    # Assert
    assert eps["rdp"] is None and eps["prv"] is None
    assert eps["pld"] is not None and math.isfinite(eps["pld"])
    assert eps["pld"] > add_remove


# --- bad releases -----------------------------------------------------------------------------

BAD_RELEASES: list[tuple[str, dict[str, Any]]] = [
    ("noise_multiplier", dict(noise_multiplier=0.0)),
    ("noise_multiplier", dict(noise_multiplier=-1.0)),
    ("noise_multiplier", dict(noise_multiplier=math.nan)),
    ("noise_multiplier", dict(noise_multiplier=math.inf)),
    ("sample_rate", dict(sample_rate=0.0)),
    ("sample_rate", dict(sample_rate=1.01)),
    ("sample_rate", dict(sample_rate=-0.5)),
    ("sample_rate", dict(sample_rate=math.nan)),
    ("steps", dict(steps=0)),
    ("steps", dict(steps=2.0)),
    ("steps", dict(steps=True)),
    ("sampling", dict(sampling="stratified")),
    ("relation", dict(relation="swap")),
]


@pytest.mark.parametrize("field,overrides", BAD_RELEASES,
                         ids=[f"{f}={list(o.values())[0]!r}" for f, o in BAD_RELEASES])
def test_gaussian_release_rejects_bad_values(field, overrides):
    args = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, **overrides}
    with pytest.raises(ValueError, match=rf"^{field}="):
        GaussianRelease(**args)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
def test_noiseless_release_has_no_guarantee(accountant):
    # Execute
    alone = epsilon(history=[(0.0, 0.1, 10)], delta=DELTA, accountant=accountant)
    among = epsilon(history=[(1.0, 0.1, 10), (0.0, 0.1, 1)], delta=DELTA, accountant=accountant)
    # Assert
    assert alone == math.inf
    assert among == math.inf


def test_releases_that_never_ran_cost_nothing():
    assert epsilon(history=[(0.0, 0.1, 0), (1.0, 0.0, 10)], delta=DELTA) == 0.0


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5])
def test_epsilon_rejects_bad_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        epsilon(history=[(1.0, 0.1, 10)], delta=delta)


def test_epsilon_rejects_unknown_accountant():
    with pytest.raises(ValueError, match="gdp"):
        epsilon(history=[(1.0, 0.1, 10)], delta=DELTA, accountant="gdp")


# --- budgets ----------------------------------------------------------------------------------

ROUND = (1.0, 0.1, 10)  # one round of local DP-SGD: σ 1.0, q 0.1, 10 steps


@pytest.fixture(scope="module")
def eps_by_round() -> list[float]:
    """Cumulative RDP ε after rounds 1, 2, 3, from Opacus' accountant used directly."""
    acc, out = RDPAccountant(), []
    for _ in range(3):
        for _ in range(ROUND[2]):
            acc.step(noise_multiplier=ROUND[0], sample_rate=ROUND[1])
        out.append(acc.get_epsilon(delta=DELTA))
    return out


def test_budget_allows_a_round_that_stays_under_the_cap(eps_by_round):
    # Prepare: a cap between ε after 2 and after 3 rounds.
    cap = (eps_by_round[1] + eps_by_round[2]) / 2
    # Execute
    check = check_budget(spent=[ROUND], planned=[ROUND], cap=cap, delta=DELTA,
                         accountant="rdp")
    # Assert
    assert check.allowed
    assert check.after == pytest.approx(eps_by_round[1], rel=1e-9)
    assert check.cap == cap
    assert "within" in check.explain()


def test_budget_refuses_the_round_that_would_cross_the_cap(eps_by_round):
    # Prepare
    cap = (eps_by_round[1] + eps_by_round[2]) / 2
    spent = [GaussianRelease(*ROUND), ROUND]  # both history shapes compose alike
    # Execute
    check = check_budget(spent=spent, planned=[ROUND], cap=cap, delta=DELTA, accountant="rdp")
    # Assert
    assert not check.allowed
    assert check.after == pytest.approx(eps_by_round[2], rel=1e-9)
    assert check.spent == pytest.approx(eps_by_round[1], rel=1e-9)
    assert "would exceed" in check.explain()


def test_budget_without_a_cap_allows_everything(eps_by_round):
    check = check_budget(spent=[ROUND, ROUND], planned=[ROUND], cap=None, delta=DELTA,
                         accountant="rdp")
    assert check.allowed
    assert check.after == pytest.approx(eps_by_round[2], rel=1e-9)


def test_budget_counts_a_shuffled_plan_without_amplification(eps_by_round):
    # Prepare: a cap the Poisson round would fit under, by a wide margin.
    cap = 2 * eps_by_round[0]
    planned = [GaussianRelease(*ROUND, sampling="shuffle")]
    # Execute
    check = check_budget(spent=[], planned=planned, cap=cap, delta=DELTA, accountant="rdp")
    # Assert: 10 unsampled steps at σ 1 cost far more (ε ≈ 19 by RDP).
    assert not check.allowed
    assert check.spent == 0.0


def test_effective_cap_is_the_smallest_set_cap():
    assert effective_cap(5.0, None, 3.0, 4.0) == 3.0
    assert effective_cap(None, 2) == 2.0
    assert effective_cap() is None
    assert effective_cap(None, None) is None


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_effective_cap_rejects_a_cap_that_is_no_bound(bad):
    with pytest.raises(ValueError, match="epsilon cap"):
        effective_cap(3.0, bad)
