"""Empirical privacy: a lower bound on ε from canaries, and a Gaussian-DP estimate.

A run plants ``m`` canaries, each included independently with probability 1/2,
trains once, and scores every canary (high score: "was included"). From the
scores and the secret membership bits this module computes:

- ``epsilon_lb``, a statistical **lower bound**: with probability at least
  ``1 - significance`` over the run, the mechanism is *not* (ε, δ)-DP for any
  ε below it (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1)
  Training Run", arXiv 2305.08846, Corollary 5.4). If it exceeds the claimed ε,
  the claim is wrong (or the run was unlucky, with probability at most
  ``significance``).
- ``ceiling``, the largest ``epsilon_lb`` the same experiment could show were
  every guess right: an audit cannot see leakage above it.
- ``gdp_epsilon_estimate``, an **estimate** (not a bound) of the ε the attack
  suggests, through μ-Gaussian DP (Dong, Roth & Su 2022): useful to compare
  runs, never to refute a claim.

Only numpy and scipy; no state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import optimize, special, stats

__all__ = [
    "DEFAULT_GUESS_FRACTIONS",
    "EmpiricalAudit",
    "GuessTry",
    "audit_from_scores",
    "ceiling",
    "clopper_pearson",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_mu",
    "guess_counts",
    "one_run_epsilon_lb",
    "one_run_p_value",
]

# Fractions of the m canaries guessed (half "in", half "out"); fixed before any
# score is seen, and paid for with a Bonferroni correction over their number.
DEFAULT_GUESS_FRACTIONS = (0.02, 0.1, 0.3, 0.6, 0.95)

# The δ > 0 search: a grid on [0, ε for δ = 0], refined around the first crossing
# (resolution ε / 32^5, about 1e-7).
_GRID_POINTS = 33
_REFINE_PASSES = 5


def _check_significance(significance: float) -> None:
    if not (isinstance(significance, (int, float)) and 0 < significance < 1):
        raise ValueError(f"significance={significance!r}: must be in (0, 1)")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 <= delta < 1):
        raise ValueError(f"delta={delta!r}: must be in [0, 1)")


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    for name, value in (("num_canaries", num_canaries), ("num_guesses", num_guesses),
                        ("num_correct", num_correct)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}={value!r}: must be an integer >= 0")
    if not num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            f"num_correct={num_correct}, num_guesses={num_guesses}, "
            f"num_canaries={num_canaries}: need num_correct <= num_guesses <= num_canaries")


def one_run_p_value(*, num_canaries: int, num_guesses: int, num_correct: int,
                    epsilon: float, delta: float) -> float:
    """p-value of ``num_correct`` right guesses out of ``num_guesses`` under (ε, δ)-DP.

    Steinke, Nasr & Jagielski (2023), Corollary 5.4: with ``m`` canaries each
    included with probability 1/2 and ``r`` guesses, an (ε, δ)-DP mechanism
    gives ``P[W >= v] <= P[Bin(r, q) >= v] + 2 m δ max_{1<=i<=v} P[v-i <= Bin(r, q) < v] / i``
    with ``q = e^ε / (1 + e^ε)``, whatever the guessing rule (as long as it
    sees only the mechanism's output).

    Returns
    -------
    float
        The bound on ``P[W >= v]``, capped at 1.
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    _check_delta(delta)
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon={epsilon!r}: must be a finite number >= 0")
    return _p_value(num_canaries, num_guesses, num_correct, float(epsilon), float(delta))


def _p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    return float(_p_values(m, r, v, np.array([eps]), delta)[0])


def _p_values(m: int, r: int, v: int, eps: np.ndarray, delta: float) -> np.ndarray:
    """:func:`one_run_p_value` at each ε of ``eps`` (one vectorised scipy call)."""
    q = special.expit(eps)[:, None]
    tail = stats.binom.sf(v - 1, r, q[:, 0])  # P[Bin(r, q) >= v]
    if delta == 0 or v == 0:
        return np.minimum(tail, 1.0)
    # P[v-i <= Bin < v] for i = 1..v, summed from pmf terms (no cancellation).
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1)[None, :], r, q), axis=1)
    alpha = np.max(below / np.arange(1, v + 1)[None, :], axis=1)
    return np.minimum(tail + 2.0 * m * delta * alpha, 1.0)


def one_run_epsilon_lb(num_guesses: int, num_correct: int, *, num_canaries: int,
                       delta: float, significance: float) -> float:
    """The ε below which (ε, δ)-DP is rejected at level ``significance`` (0.0 if none).

    The largest ε such that :func:`one_run_p_value` stays below
    ``significance`` on all of ``[0, ε]`` (the first crossing, so a p-value
    that were not monotone in ε could only make the bound lower). For δ = 0
    the p-value is a binomial tail and the answer is closed-form: the
    Clopper–Pearson lower confidence limit on the guessing accuracy, as
    log-odds. The δ term only adds to the p-value, so that answer bounds the
    search for δ > 0: a grid on it finds the first crossing, finer grids refine it.

    Parameters
    ----------
    num_guesses, num_correct
        ``r`` guesses made (abstentions excluded) and ``v`` of them right.
    num_canaries
        ``m``, all canaries, guessed or not (the δ term grows with it).
    delta
        The δ of the claim being tested, in [0, 1).
    significance
        Probability, under the claim, of a bound above its ε; in (0, 1).
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    _check_delta(delta)
    _check_significance(significance)
    m, r, v = int(num_canaries), int(num_guesses), int(num_correct)
    if v == 0:
        return 0.0
    # P[Bin(r, q) >= v] = I_q(v, r - v + 1) < significance  <=>  q < its inverse.
    q_lo = float(stats.beta.ppf(significance, v, r - v + 1))
    eps_pure = float(special.logit(q_lo)) if q_lo > 0.5 else 0.0
    if delta == 0 or eps_pure == 0.0:
        return eps_pure
    low, high = 0.0, eps_pure
    for _ in range(_REFINE_PASSES):
        grid = np.linspace(low, high, _GRID_POINTS)
        accepted = _p_values(m, r, v, grid, delta) >= significance
        if not accepted.any():  # only by rounding at eps_pure, where the δ term is nil
            return float(grid[-1])
        first = int(np.argmax(accepted))
        if first == 0:  # grid[0] is 0.0 in the first pass, a rejected ε afterwards
            return 0.0
        low, high = float(grid[first - 1]), float(grid[first])
    return low


def guess_counts(num_canaries: int, guess_fractions: Sequence[float]) -> list[tuple[int, int]]:
    """``(k_plus, k_minus)`` for each fraction: ``k_plus = k_minus = floor(f * m / 2)``."""
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, (int, np.integer)) \
            or num_canaries < 2:
        raise ValueError(f"num_canaries={num_canaries!r}: must be an integer >= 2")
    if len(guess_fractions) == 0:
        raise ValueError("guess_fractions=(): need at least one fraction")
    counts = []
    for f in guess_fractions:
        if not (isinstance(f, (int, float)) and 0 < f <= 1):
            raise ValueError(f"guess_fractions contains {f!r}: each must be in (0, 1]")
        k = int(f * num_canaries) // 2
        if k < 1:
            raise ValueError(f"guess fraction {f!r} of num_canaries={num_canaries} "
                             "makes no guess; use a larger fraction or more canaries")
        counts.append((k, k))
    if len(set(counts)) != len(counts):
        raise ValueError(f"guess_fractions={tuple(guess_fractions)!r}: two fractions give the "
                         f"same guesses with num_canaries={num_canaries}")
    return counts


def ceiling(num_canaries: int, *, delta: float, significance: float,
            guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS) -> float:
    """The largest ``epsilon_lb`` :func:`audit_from_scores` can return: every guess right.

    Above it the audit is blind: a mechanism leaking more still shows at most
    this. It grows roughly like ``log(m)``.
    """
    tries = guess_counts(num_canaries, guess_fractions)
    level = significance / len(tries)
    return max(one_run_epsilon_lb(kp + km, kp + km, num_canaries=num_canaries, delta=delta,
                                  significance=level) for kp, km in tries)


def clopper_pearson(successes: int, trials: int, *, confidence: float) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval for a binomial proportion.

    Each side misses with probability at most ``(1 - confidence) / 2``: the
    limits are beta quantiles (Clopper & Pearson 1934). An empty sample
    (``trials == 0``) gives ``(0, 1)``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r}: must be in (0, 1)")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes={successes}, trials={trials}: need 0 <= successes <= trials")
    if trials == 0:
        return 0.0, 1.0
    tail = (1 - confidence) / 2
    low = 0.0 if successes == 0 else stats.beta.ppf(tail, successes, trials - successes + 1)
    high = 1.0 if successes == trials else stats.beta.ppf(1 - tail, successes + 1,
                                                            trials - successes)
    return float(low), float(high)


def gdp_mu(tpr: float, fpr: float) -> float:
    """μ of the Gaussian-DP trade-off curve through (FPR, TPR), floored at 0.

    μ-GDP allows ``TPR <= Φ(Φ⁻¹(FPR) + μ)`` (Dong, Roth & Su 2022), so a point
    needs ``μ >= Φ⁻¹(1 - FPR) - Φ⁻¹(1 - TPR)``.
    """
    for name, value in (("tpr", tpr), ("fpr", fpr)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name}={value!r}: must be in [0, 1]")
    if tpr <= fpr:
        return 0.0
    return max(0.0, float(special.ndtri(1 - fpr) - special.ndtri(1 - tpr)))


def gdp_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of μ-GDP: ``Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2)`` (Dong, Roth & Su, Cor. 2.13)."""
    if mu <= 0:
        return 0.0
    first = special.ndtr(-epsilon / mu + mu / 2)
    second = math.exp(epsilon + special.log_ndtr(-epsilon / mu - mu / 2))
    return float(max(first - second, 0.0))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The ε at which μ-GDP is (ε, δ)-DP: the root of :func:`gdp_delta` (0 if none needed).

    Returns ``inf`` for ``delta == 0`` and ``mu > 0``.
    """
    if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu={mu!r}: must be a finite number >= 0")
    _check_delta(delta)
    if mu == 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    if delta == 0:
        return math.inf
    high = 1.0
    while gdp_delta(high, mu) > delta:
        high *= 2
    return float(optimize.brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, high, xtol=1e-12))


@dataclass(frozen=True)
class GuessTry:
    """One ``(k_plus, k_minus)`` tried: its guesses, right ones, and bound."""

    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    epsilon_lb: float
    gdp_mu: float


@dataclass(frozen=True)
class EmpiricalAudit:
    """The result of one canary audit.

    Attributes
    ----------
    m
        Canaries, in and out.
    k_plus, k_minus, guesses, correct
        The guessing rule the bound comes from (the try with the largest bound):
        "in" for the ``k_plus`` highest scores, "out" for the ``k_minus`` lowest.
    epsilon_lb
        Lower bound on ε at ``delta``, valid with probability ``1 - significance``
        (Bonferroni over ``bonferroni_tries`` rules fixed in advance).
    ceiling
        The largest ``epsilon_lb`` this experiment could show.
    gdp_mu, gdp_epsilon_estimate
        μ from Clopper–Pearson bounds (TPR low, FPR high) of the best "in"
        threshold, and its ε at ``delta``. An estimate, not a bound.
    tries
        Every rule tried.
    """

    m: int
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    epsilon_lb: float
    ceiling: float
    gdp_mu: float
    gdp_epsilon_estimate: float
    significance: float
    delta: float
    bonferroni_tries: int
    members: int
    tries: tuple[GuessTry, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; a non-finite float (δ = 0 GDP estimate) becomes ``None``."""
        out = asdict(self)
        out["tries"] = [asdict(t) for t in self.tries]
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
        return out


def _check_scores(scores: Any, membership: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float)
    b = np.asarray(membership)
    if s.ndim != 1 or b.shape != s.shape:
        raise ValueError(f"scores shape {s.shape} and membership shape {b.shape}: "
                         "need two 1-D arrays of the same length")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores: {int(np.sum(~np.isfinite(s)))} are not finite")
    if not np.all((b == 0) | (b == 1)):
        bad = b[(b != 0) & (b != 1)]
        raise ValueError(f"membership contains {bad[0]!r}: must be 0/1 (or bool)")
    return s, b.astype(bool)


def audit_from_scores(
    scores: Any,
    membership: Any,
    *,
    delta: float,
    significance: float = 0.05,
    guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
    seed: int = 0,
) -> EmpiricalAudit:
    """One-run audit from canary scores (Steinke, Nasr & Jagielski 2023).

    For each fraction ``f`` (fixed before the scores are seen), guess "in" for
    the ``k = floor(f m / 2)`` highest scores and "out" for the ``k`` lowest,
    count the right guesses, and bound ε at level ``significance / tries``; the
    reported bound is the largest (Bonferroni: all hold together with
    probability ``1 - significance``). Ties in the scores are broken by a
    random order drawn from ``seed``, never by position, which could carry
    membership.

    Parameters
    ----------
    scores
        One score per canary, shape ``(m,)``; higher means "included".
    membership
        The secret inclusion bits, 0/1 or bool, shape ``(m,)``.
    delta
        The δ of the claim being tested.
    """
    s, b = _check_scores(scores, membership)
    _check_delta(delta)
    _check_significance(significance)
    m = len(s)
    counts = guess_counts(m, guess_fractions)
    level = significance / len(counts)
    tiebreak = np.random.default_rng(seed).permutation(m)
    order = np.lexsort((tiebreak, s))  # ascending score
    ranked = b[order]
    members = int(b.sum())
    tries = []
    for kp, km in counts:
        tp = int(ranked[m - kp:].sum())
        right_out = int(km - ranked[:km].sum())
        eps = one_run_epsilon_lb(kp + km, tp + right_out, num_canaries=m, delta=delta,
                                 significance=level)
        # TPR low and FPR high, each side at level / 2: jointly at `level`.
        tpr_lo = clopper_pearson(tp, members, confidence=1 - level)[0]
        fpr_hi = clopper_pearson(kp - tp, m - members, confidence=1 - level)[1]
        tries.append(GuessTry(kp, km, kp + km, tp + right_out, eps, gdp_mu(tpr_lo, fpr_hi)))
    best = max(tries, key=lambda t: (t.epsilon_lb, t.correct / t.guesses))
    mu = max(t.gdp_mu for t in tries)
    return EmpiricalAudit(
        m=m, k_plus=best.k_plus, k_minus=best.k_minus, guesses=best.guesses,
        correct=best.correct, epsilon_lb=best.epsilon_lb,
        ceiling=ceiling(m, delta=delta, significance=significance,
                        guess_fractions=guess_fractions),
        gdp_mu=mu, gdp_epsilon_estimate=gdp_epsilon(mu, delta), significance=significance,
        delta=delta, bonferroni_tries=len(counts), members=members, tries=tuple(tries))
