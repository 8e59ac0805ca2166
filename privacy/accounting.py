"""Pure accounting over histories of Gaussian releases.

A history is a list of releases: :class:`GaussianRelease` (σ, sampling rate,
steps, sampling method, neighbouring relation) or, for the common case of
Poisson-sampled DP-SGD under add/remove-one, plain ``(σ, q, steps)`` tuples
(the shape of an Opacus accountant's ``history``). These functions hold no
state: whoever owns a history persists it (the ledger) and asks for ε from the
whole of it, so every ε is cumulative.

Three independent accountants answer the same question:

| name | analysis | implementation |
| --- | --- | --- |
| ``rdp`` | Rényi DP (Mironov 2017), conversion of Balle et al. 2020 | Opacus |
| ``prv`` | privacy random variables (Gopi, Lee & Wutschitz 2021) | Opacus |
| ``pld`` | privacy loss distributions, pessimistic discretisation | Google dp-accounting |

Sampling methods: ``poisson`` is amplified by its rate. ``shuffle`` (fixed-size
batches from a shuffled loader) and ``none`` (the whole data set each step)
have no Poisson guarantee, so they are accounted as ``q = 1`` per step: an
over-count, never an under-count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from privacy.memo import Lru

__all__ = [
    "ACCOUNTANTS",
    "GaussianRelease",
    "Release",
    "UnsupportedAccounting",
    "compress",
    "epsilon_all",
    "EpsilonMemo",
    "RdpCurves",
    "planned_poisson_schedule",
    "calibrate_noise_multiplier",
    "epsilon",
]

Release = tuple[float, float, int]

ACCOUNTANTS = ("rdp", "prv", "pld")
SAMPLING_METHODS = ("poisson", "shuffle", "none")
RELATIONS = ("add_remove", "replace_one")


class UnsupportedAccounting(ValueError):
    """This accountant cannot analyse a release of this kind."""


def _finite_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r}: must be a finite number > 0")


@dataclass(frozen=True)
class GaussianRelease:
    """``steps`` releases of a Gaussian mechanism with noise std σ·(sensitivity).

    ``sample_rate`` is the probability that one record (or one site, for
    client-level DP) takes part in a step; it is only an amplification when
    ``sampling == "poisson"``.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    sampling: str = "poisson"
    relation: str = "add_remove"

    def __post_init__(self) -> None:
        _finite_positive("noise_multiplier", self.noise_multiplier)
        if not (isinstance(self.sample_rate, (int, float)) and math.isfinite(self.sample_rate)
                and 0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate={self.sample_rate!r}: must be in (0, 1]")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r}: must be an integer >= 1")
        if self.sampling not in SAMPLING_METHODS:
            raise ValueError(f"sampling={self.sampling!r}: choose one of {list(SAMPLING_METHODS)}")
        if self.relation not in RELATIONS:
            raise ValueError(f"relation={self.relation!r}: choose one of {list(RELATIONS)}")

    @property
    def accounted_rate(self) -> float:
        """The rate the accountants use: ``sample_rate`` only under Poisson sampling."""
        return self.sample_rate if self.sampling == "poisson" else 1.0

MAX_USEFUL_SIGMA = 1e3


def planned_poisson_schedule(
    *, num_samples: int, batch_size: int, local_epochs: int, rounds: int
) -> tuple[float, int, int]:
    """The sampling rate and steps Opacus' Poisson loader will use.

    Opacus converts a loader of ``ceil(n / B)`` batches into Poisson sampling
    with ``q = 1 / ceil(n / B)`` and ``int(1 / q)`` steps per epoch.

    Returns
    -------
    (sample_rate, steps_per_round, total_steps)
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: a client needs at least one record")
    if batch_size < 1 or local_epochs < 1 or rounds < 1:
        raise ValueError("batch_size, local_epochs and rounds must be >= 1")
    num_batches = -(-num_samples // batch_size)
    sample_rate = 1.0 / num_batches
    steps_per_round = local_epochs * int(1 / sample_rate)
    return sample_rate, steps_per_round, steps_per_round * rounds


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prior: Sequence[GaussianRelease | Sequence[Any]] = (),
) -> float:
    """Smallest σ (to a tolerance) whose ε after ``steps`` is at most the target.

    ``prior`` releases (e.g. a federated-statistics release made before
    training) are composed in, so that the total stays within the target.
    Without them this is Opacus' ``get_noise_multiplier``; with them, the same
    bisection on σ over the whole history. The returned σ always gives
    ε ≤ ``target_epsilon``.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon={target_epsilon}: must be > 0")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta}: must be in (0, 1)")
    prior = list(prior)

    def eps_at(sigma: float) -> float:
        return epsilon(history=[*prior, (sigma, sample_rate, steps)], delta=delta,
                       accountant=accountant)

    if target_epsilon < 1.0 or prior:
        # The RDP -> (ε, δ) conversion has a floor (about 0.1 at δ = 1e-5), and Opacus'
        # search takes minutes to find that out; ask once, at a σ no useful run exceeds.
        floor = eps_at(MAX_USEFUL_SIGMA)
        if floor > target_epsilon:
            spent = " (with the prior releases)" if prior else ""
            raise ValueError(
                f"target_epsilon={target_epsilon}: unreachable with the {accountant} "
                f"accountant at delta={delta}{spent}; even noise_multiplier="
                f"{MAX_USEFUL_SIGMA:g} gives epsilon={floor:.4f}"
            )
    if not prior:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.005,
            )
        )
    low, high = 0.0, 10.0
    while eps_at(high) > target_epsilon:
        low, high = high, min(2 * high, MAX_USEFUL_SIGMA)
    while True:
        mid = (low + high) / 2
        eps = eps_at(mid) if mid > 0 else math.inf
        if eps > target_epsilon:
            low = mid
        else:
            high = mid
            if target_epsilon - eps < 0.005:
                return float(high)
        if high - low < 1e-4:
            return float(high)


def _release(item: GaussianRelease | Sequence[Any]) -> GaussianRelease | None:
    """A history item as a release; ``None`` for an empty one (no step, or q = 0)."""
    if isinstance(item, GaussianRelease):
        return item
    sigma, q, n = item
    if int(n) == 0 or float(q) == 0.0:
        return None
    if float(sigma) <= 0:
        raise _Noiseless()
    return GaussianRelease(float(sigma), float(q), int(n))


class _Noiseless(Exception):
    pass


def compress(history: Iterable[GaussianRelease | Sequence[Any]]) -> list[Release]:
    """Merge releases with the same accounted (σ, q) by adding their steps.

    Exact for RDP, PRV and PLD alike: composition depends only on how many
    steps ran at each (σ, q), not on their order. Only add/remove-one
    releases can be merged into Opacus-shaped tuples.
    """
    steps: dict[tuple[float, float], int] = {}
    for item in history:
        if not isinstance(item, GaussianRelease):
            sigma, q, n = item
            key = (float(sigma), float(q))
            steps[key] = steps.get(key, 0) + int(n)
            continue
        if item.relation != "add_remove":
            raise UnsupportedAccounting(
                f"relation={item.relation!r}: Opacus' accountants analyse add/remove-one only")
        key = (item.noise_multiplier, item.accounted_rate)
        steps[key] = steps.get(key, 0) + item.steps
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def _replace_as_add_remove(r: GaussianRelease) -> GaussianRelease:
    """Replace-one without sampling is add/remove-one at twice the sensitivity."""
    if r.relation == "add_remove":
        return r
    if r.accounted_rate < 1.0:
        raise UnsupportedAccounting(
            "relation='replace_one' with Poisson sampling: only the pld accountant "
            "analyses it")
    return GaussianRelease(r.noise_multiplier / 2, 1.0, r.steps, r.sampling, "add_remove")


def _pld_epsilon(releases: list[GaussianRelease], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    # One relation for the whole composition. Replace-one is the weaker guarantee,
    # and dp-accounting applies its factor-2 sensitivity to every event itself, so
    # an add/remove release enters unchanged.
    relation = "replace_one" if any(r.relation == "replace_one" for r in releases) \
        else "add_remove"
    nr = dp_accounting.NeighboringRelation
    acc = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=nr.REPLACE_ONE if relation == "replace_one" else nr.ADD_OR_REMOVE_ONE)
    merged: dict[tuple[float, float], int] = {}
    for r in releases:
        key = (r.noise_multiplier, r.accounted_rate)
        merged[key] = merged.get(key, 0) + r.steps
    for (sigma, q), n in merged.items():
        event = dp_accounting.GaussianDpEvent(sigma)
        if q < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        acc.compose(event, n)
    return float(acc.get_epsilon(delta))


def epsilon(*, history: Iterable[GaussianRelease | Sequence[Any]], delta: float,
            accountant: str = "rdp", curves: RdpCurves | None = None) -> float:
    """Cumulative ε at ``delta`` of a whole history (0.0 for an empty one).

    ``rdp`` and ``prv`` are Opacus' accountants, ``pld`` is dp-accounting's.
    A noiseless release (σ = 0) gives ``inf``: it has no guarantee at all.
    Raises :class:`UnsupportedAccounting` when ``accountant`` cannot analyse
    the history (Opacus and Poisson-sampled replace-one). ``curves``: where
    the RDP of one step at each (σ, q) is remembered between calls
    (:class:`RdpCurves`); the values are the same with or without it.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r}: choose one of {list(ACCOUNTANTS)}")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r}: must be in (0, 1)")
    try:
        releases = [r for r in map(_release, history) if r is not None]
    except _Noiseless:
        return math.inf
    if not releases:
        return 0.0
    if accountant == "pld":
        return _pld_epsilon(releases, delta)
    history = compress(_replace_as_add_remove(r) for r in releases)
    curves = curves if curves is not None else RdpCurves(maxsize=None)
    if accountant == "rdp":
        return curves.epsilon(history, delta)
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = history
    # Opacus' own discretisation and composition; only the domain's RDP bounds
    # come from the curves (the same values, tested).
    acc._get_domain = functools.partial(_prv_domain, curves)  # type: ignore[method-assign]
    return float(acc.get_epsilon(delta=delta))


def _prv_domain(curves: RdpCurves, *, prvs: Sequence[Any], num_self_compositions: Sequence[int],
                eps_error: float, delta_error: float) -> Any:
    """Opacus 1.6's ``PRVAccountant._get_domain``, its RDP bounds read from ``curves``.

    The PRV accountant truncates each privacy loss to [-L, L] and discretises it on a
    mesh (Gopi, Lee & Wutschitz 2021, remark 5.6, as ``compute_safe_domain_size``
    computes it): L is 3 more than the largest of the whole history's RDP ε at
    δ_err/4, each (σ, q)'s one-step RDP ε at δ_err/(8 · all steps), and ε_err.
    Opacus computes those RDP values afresh on every call, at 151 orders, most of
    them fractional with a series summed in Python: 85 % of an ε that takes 0.7 s.
    """
    from opacus.accountants.analysis.prv.domain import Domain

    total = sum(num_self_compositions)
    entries = [(prv.noise_multiplier, prv.sample_rate, n)
               for prv, n in zip(prvs, num_self_compositions, strict=True)]
    half_width = curves.epsilon(entries, delta_error / 4)
    for sigma, q, _ in entries:
        half_width = max(half_width, curves.epsilon([(sigma, q, 1)],
                                                    delta_error / (8 * total)))
    half_width = max(half_width, eps_error) + 3
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    return Domain.create_aligned(-half_width, half_width, mesh)


class RdpCurves:
    """One step's RDP at Opacus' default orders, by (σ, q), remembered.

    Opacus' RDP accountant, and the PRV accountant's choice of domain, compute
    the Poisson-subsampled Gaussian's RDP at 151 orders on every call, though it
    depends only on (σ, q): ``steps`` steps are ``steps`` times one step's. Here
    each (σ, q) is computed once, with Opacus' own ``compute_rdp``, and
    :meth:`epsilon` composes and converts exactly as ``RDPAccountant`` does, so
    every value is the one Opacus gives (tested for equality). An explicit
    object, owned by an :class:`EpsilonMemo` or by one :func:`epsilon` call.

    Parameters
    ----------
    maxsize : (σ, q) pairs kept, least recently used evicted first (``None``: no
        bound). One pair is 151 floats.
    """

    def __init__(self, maxsize: int | None = 1024) -> None:
        self._lru: Lru[Any] = Lru(maxsize)

    def __len__(self) -> int:
        return len(self._lru)

    def step(self, sigma: float, q: float) -> Any:
        """One step's RDP at each of Opacus' default orders (a read-only array)."""
        def compute() -> Any:
            from opacus.accountants.analysis.rdp import compute_rdp

            curve = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_rdp_orders())
            curve.flags.writeable = False
            return curve
        return self._lru.get((float(sigma), float(q)), compute)

    def epsilon(self, history: Sequence[Release], delta: float) -> float:
        """What Opacus' ``RDPAccountant`` with ``history`` gives for ``get_epsilon(delta)``."""
        from opacus.accountants.analysis.rdp import get_privacy_spent

        if not history:
            return 0.0
        # Summed in the history's order, as RDPAccountant sums: the same floats.
        rdp = sum([self.step(sigma, q) * steps for sigma, q, steps in history])
        eps, _ = get_privacy_spent(orders=_rdp_orders(), rdp=rdp, delta=delta)
        return float(eps)


def _rdp_orders() -> list[float]:
    """The RDP orders Opacus' accountants use when given none."""
    from opacus.accountants import RDPAccountant

    return RDPAccountant.DEFAULT_ALPHAS


def epsilon_all(*, history: Iterable[GaussianRelease | Sequence[Any]],
                delta: float) -> dict[str, float | None]:
    """ε by each of the three accountants (``None`` where one cannot analyse it)."""
    history = list(history)
    out: dict[str, float | None] = {}
    for name in ACCOUNTANTS:
        try:
            out[name] = epsilon(history=history, delta=delta, accountant=name)
        except UnsupportedAccounting:
            out[name] = None
    return out


class EpsilonMemo:
    """ε of histories, remembered by their composition (order does not matter).

    One accountant call costs ~0.5–2 s, and a run asks the same question often
    (sites with the same σ and q; the same history once per report). The memo
    is an explicit object: whoever creates it owns it for as long as it lives
    (a run, an audit); it is never a module global.

    Parameters
    ----------
    maxsize : histories kept, the least recently used evicted first (``None``:
        no bound; 0: keeps none, every call computes). ``hits`` and ``misses``
        count the calls answered from the memo and computed.
    """

    def __init__(self, maxsize: int | None = None) -> None:
        self._lru: Lru[float] = Lru(maxsize)
        # One step's RDP by (σ, q), for the histories the memo has not seen.
        self.curves = RdpCurves()

    @property
    def maxsize(self) -> int | None:
        return self._lru.maxsize

    @property
    def hits(self) -> int:
        return self._lru.hits

    @property
    def misses(self) -> int:
        return self._lru.misses

    def __len__(self) -> int:
        return len(self._lru)

    def clear(self) -> None:
        """Forget every result (and the counts)."""
        self._lru.clear()
        self.curves = RdpCurves()

    def __call__(self, history: Iterable[GaussianRelease | Sequence[Any]], delta: float,
                 accountant: str) -> float:
        items = list(history)
        try:
            releases = [r for r in map(_release, items) if r is not None]
        except _Noiseless:
            return math.inf
        steps: dict[tuple[float, float, str, str], int] = {}
        for r in releases:
            k = (r.noise_multiplier, r.sample_rate, r.sampling, r.relation)
            steps[k] = steps.get(k, 0) + r.steps
        key = (delta, accountant, tuple(sorted((*k, n) for k, n in steps.items())))
        return self._lru.get(key, lambda: epsilon(history=releases, delta=delta,
                                                  accountant=accountant, curves=self.curves))

    def all(self, history: Iterable[GaussianRelease | Sequence[Any]],
            delta: float) -> dict[str, float | None]:
        """Like :func:`epsilon_all`, through the memo."""
        items = list(history)
        out: dict[str, float | None] = {}
        for name in ACCOUNTANTS:
            try:
                out[name] = self(items, delta, name)
            except UnsupportedAccounting:
                out[name] = None
        return out
