"""The canary audit of a run directory, as ``fedpriv audit`` checks it.

A run with ``audit=sample`` leaves ``audit_empirical.json``: the canaries'
membership bits and scores, and the lower bound ε_lb the run computed from them
(:mod:`server.empirical`). :func:`check_empirical` recomputes ε_lb from the
bits and scores at the audit's δ, holds it against the claimed ε recomputed
from the ledger (the largest sample-level ε of the sites with canaries) and
returns what it found:

- an ``error`` when ε_lb exceeds the claimed ε: evidence of a privacy bug;
- an ``info`` stating the ceiling, the largest ε_lb the run could show: claims
  above it cannot be refuted by this run;
- an ``error`` when the recorded ε_lb does not follow from the recorded scores,
  or ``summary.json`` reports a bound whose file is gone.

With ``audit=client`` (``level`` ``client``) the canaries are virtual clients of
the server's client-level DP mechanism, in every round that made a release; the
claim is then the ε of one such release per round composed, without sampling
(:func:`canary_client_history`), recomputed from the ledger's client-level rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from privacy.accounting import EpsilonMemo, GaussianRelease
from privacy.empirical import audit_from_scores
from privacy.report import EmpiricalSummary, Finding, SiteAudit

__all__ = ["EMPIRICAL_FILE", "canary_client_history", "check_empirical"]

EMPIRICAL_FILE = "audit_empirical.json"
_TOLERANCE = 1e-9  # the same scores give the same bound (deterministic tie-break)
BUG_CAUSES = ("noise too small, a sampler other than the one accounted, a round not charged")


def canary_client_history(releases: Iterable[tuple[int, float]]) -> list[GaussianRelease]:
    """What a canary client of ``audit=client`` spent: one Gaussian release per round.

    ``releases``: ``(round, noise multiplier)`` of the client-level mechanism's
    releases (several per round, e.g. one ledger row per site: the smallest σ
    of the round counts). A canary client is in every release with certainty,
    so each is accounted with sampling rate 1 (no amplification), sensitivity C,
    add/remove one client.
    """
    sigma: dict[int, float] = {}
    for rnd, s in releases:
        sigma[rnd] = min(s, sigma.get(rnd, s))
    return [GaussianRelease(s, 1.0, 1, "none") for _, s in sorted(sigma.items())]


def _load(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    for key in ("scores", "membership", "significance", "delta", "sites", "epsilon_lb"):
        if key not in doc:
            raise ValueError(f"no {key!r}")
    if len(doc["scores"]) != len(doc["membership"]):
        raise ValueError(f"{len(doc['scores'])} scores for {len(doc['membership'])} "
                         "membership bits")
    return doc


def _claims(doc: dict[str, Any], sites: list[SiteAudit]) -> dict[str, SiteAudit]:
    """The audited sites that held canaries."""
    names = {s.get("site") for s in doc["sites"] if s.get("canaries", 0) > 0}
    return {s.site: s for s in sites if s.site in names}


def _by_accountant(sites: list[SiteAudit]) -> dict[str, float | None]:
    """The largest sample-level ε of ``sites`` per accountant (``None``: one cannot say)."""
    out: dict[str, float | None] = {}
    for acc in sorted({a for s in sites for a in s.levels.get("sample", {})}):
        values = [s.levels.get("sample", {}).get(acc) for s in sites]
        out[acc] = None if any(v is None for v in values) else max(
            v for v in values if v is not None)
    return out


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _client_claims(releases: Iterable[tuple[int, float]], delta: float,
                   memo: EpsilonMemo | None) -> dict[str, float | None]:
    history = canary_client_history(releases)
    return (memo or EpsilonMemo()).all(history, delta) if history else {}


def check_empirical(run_dir: Path, sites: list[SiteAudit], *, delta: float,
                    summary: dict[str, Any], client_releases: Iterable[tuple[int, float]] = (),
                    accountant: str = "prv", memo: EpsilonMemo | None = None
                    ) -> tuple[EmpiricalSummary | None, list[Finding]]:
    """Recompute and judge the run's canary audit (``None`` when the run made none).

    ``client_releases``: ``(round, σ)`` of the ledger's client-level rows, the claim
    of an ``audit=client`` run (``accountant``: the run's); ``sites`` give the claim
    of ``audit=sample``.
    """
    path = run_dir / EMPIRICAL_FILE
    reported = summary.get("epsilon_empirical_lower_bound")
    if not path.exists():
        if reported is None:
            return None, []
        return None, [Finding("error", "empirical_audit_missing",
                              f"summary.json reports epsilon_empirical_lower_bound={reported} "
                              f"but {EMPIRICAL_FILE} is missing")]
    try:
        doc = _load(path)
        significance, seed = float(doc["significance"]), int(doc.get("tiebreak_seed", 0))
        result, at_run_delta = (audit_from_scores(doc["scores"], doc["membership"], delta=d,
                                                  significance=significance, seed=seed)
                                for d in (delta, float(doc["delta"])))
    except (OSError, ValueError, TypeError) as ex:
        return None, [Finding("error", "empirical_audit_unreadable", f"{path}: {ex}")]
    findings = []
    recorded = doc.get("epsilon_lb")
    if not isinstance(recorded, (int, float)) or \
            abs(recorded - at_run_delta.epsilon_lb) > _TOLERANCE:
        findings.append(Finding("error", "empirical_mismatch",
                                f"{EMPIRICAL_FILE} records epsilon_lb={recorded!r}; its scores "
                                f"and membership bits give {at_run_delta.epsilon_lb:.6f}"))
    level = str(doc.get("level", "sample"))
    if level == "client":
        claimed_site = None
        by_accountant = _client_claims(client_releases, delta, memo)
        claimed = by_accountant.get(accountant)
    else:
        by_site = _claims(doc, sites)
        claimed_site = max(by_site, key=lambda k: by_site[k].recomputed) if by_site else None
        claimed = by_site[claimed_site].recomputed if claimed_site is not None else None
        by_accountant = _by_accountant(list(by_site.values()))
    out = EmpiricalSummary(
        level=level, m=result.m, members=result.members,
        guesses=result.guesses, correct=result.correct, epsilon_lb=result.epsilon_lb,
        ceiling=result.ceiling, gdp_epsilon_estimate=_finite(result.gdp_epsilon_estimate),
        significance=result.significance, delta=delta, claimed_epsilon=claimed,
        claimed_site=claimed_site, claimed_by_accountant=by_accountant,
        recorded_epsilon_lb=recorded if isinstance(recorded, (int, float)) else None)
    findings += _verdict(out)
    return out, findings


def _verdict(e: EmpiricalSummary) -> list[Finding]:
    confidence = f"{1 - e.significance:.0%}"
    findings = []
    if e.claimed_epsilon is None:
        findings.append(Finding("warning", "empirical_no_claim",
                                "no client-level release in the ledger: the canary audit has "
                                "no claim to test" if e.level == "client" else
                                "no site with canaries has a sample-level release in the "
                                "ledger: the canary audit has no claim to test"))
    elif e.epsilon_lb > e.claimed_epsilon:
        findings.append(Finding(
            "error", "empirical_lower_bound_exceeds_claim",
            f"the empirical lower bound exceeds the claimed ε: evidence of a privacy bug "
            f"({BUG_CAUSES}). ε_lb = {e.epsilon_lb:.3f} (holds with probability "
            f"{confidence}) > claimed ε = {e.claimed_epsilon:.3f} at δ = {e.delta:g}",
            site=e.claimed_site))
    above = "" if e.claimed_epsilon is None or e.claimed_epsilon <= e.ceiling else (
        f"; the claimed ε = {e.claimed_epsilon:.3f} is above it")
    findings.append(Finding(
        "info", "empirical_ceiling",
        f"with m = {e.m} canaries this run could show at most ε_lb = {e.ceiling:.3f} (every "
        f"guess right): a claimed ε above that cannot be refuted by this run{above}; and a "
        "lower bound below the claim is no evidence that the claim holds"))
    return findings
