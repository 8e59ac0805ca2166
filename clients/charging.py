"""Charging a site's releases to its ledger: cap check first, commit second.

Every release a site makes (a round of DP-SGD, a noised statistics vector)
goes through :func:`charge`: the site's caps are checked against the
composition of *everything* it ever released plus this one, and only then is
the charge committed. The caller releases nothing before this returns a row
(write-ahead), and nothing at all when it returns a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass

from clients.config import PrivacyConfig
from clients.noise import describe_noise_generator
from clients.state import Site, site_history
from privacy import EpsilonMemo, GaussianRelease
from privacy.budget import BudgetCheck, check_budget, effective_cap
from privacy.ledger import Charge, Ledger, LedgerRow

__all__ = ["Caps", "Refusal", "caps_of", "charge", "run_releases"]


@dataclass(frozen=True)
class Caps:
    cap: float | None
    binding: str  # which is the tightest: "site" or "global"


@dataclass(frozen=True)
class Refusal:
    """A release the site's cap cannot pay for (nothing was charged)."""

    check: BudgetCheck
    binding: str


def caps_of(site: Site, pc: PrivacyConfig) -> Caps:
    """The tightest of the site's own cap, the configured site cap and the global cap."""
    site_cap = effective_cap(site.epsilon_cap, pc.site_cap(site.partition_id))
    cap = effective_cap(site_cap, pc.epsilon_cap)
    global_binds = pc.epsilon_cap is not None and (site_cap is None or pc.epsilon_cap < site_cap)
    return Caps(cap, "global" if global_binds else "site")


def run_releases(ledger: Ledger, run_id: str, site: str,
                 level: str | None = None) -> list[GaussianRelease]:
    """This run's releases at the site (at ``level``, or all levels)."""
    rows = ledger.rows(run_id=run_id, site=site)
    return [r.charge.release() for r in rows if level is None or r.charge.level == level]


def charge(ledger: Ledger, *, site: Site, pc: PrivacyConfig, caps: Caps, run_id: str,
           server_round: int, level: str, release: GaussianRelease, clipping_norm: float,
           num_records: int, memo: EpsilonMemo | None = None) -> LedgerRow | Refusal:
    """Check ``release`` against the site's caps, then commit it.

    The committed row's ``epsilon_reported`` is this run's cumulative ε at
    ``level`` after the release (``pc.accountant``, ``pc.delta``). ``memo``:
    where ε is looked up first (the worker's, ``clients.cache``); it changes
    no value, only how often the accountant runs.
    """
    lifetime = site_history(ledger, site.name)
    check = check_budget(spent=lifetime, planned=[release], cap=caps.cap, delta=pc.delta,
                         accountant=pc.accountant, memo=memo)
    if not check.allowed:
        return Refusal(check, caps.binding)
    same_level = run_releases(ledger, run_id, site.name, level)
    everything_is_this_level = lifetime == same_level
    if memo is None:
        memo = EpsilonMemo(maxsize=0)  # 0: computes every call
    eps_level = check.after if everything_is_this_level else memo(
        [*same_level, release], pc.delta, pc.accountant)
    return ledger.append(Charge(
        run_id=run_id, round=server_round, site=site.name, level=level,
        noise_multiplier=release.noise_multiplier, clipping_norm=clipping_norm,
        sample_rate=release.sample_rate, steps=release.steps, delta=pc.delta,
        sampling=release.sampling, relation=release.relation,
        noise_generator=describe_noise_generator(pc.noise_generator), num_records=num_records,
        epsilon_cap=caps.cap, epsilon_reported=eps_level, accountant=pc.accountant))
