"""Privacy budgets: may a site make its next release under its ε cap?

A cap bounds the composition of *every* release that touched a site's records
(all levels, all runs in the site's ledger), at the run's δ, with the run's
accountant. The check is made before the release, against what the site would
have spent after it, so a cap is never crossed, only approached.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from privacy.accounting import EpsilonMemo, GaussianRelease

__all__ = ["BudgetCheck", "check_budget", "effective_cap"]


@dataclass(frozen=True)
class BudgetCheck:
    """``after``: ε once the planned releases are made; ``spent``: before them
    (computed only when the check fails, where it explains the refusal)."""

    allowed: bool
    after: float
    cap: float | None
    spent: float | None = None

    def explain(self) -> str:
        spent = "" if self.spent is None else f"spent epsilon={self.spent:.4f}; "
        if self.cap is None:
            return f"{spent}no cap; epsilon after this release {self.after:.4f}"
        verdict = "within" if self.allowed else "would exceed"
        return (f"{spent}after this release epsilon={self.after:.4f}, which {verdict} "
                f"the cap {self.cap:g}")


def effective_cap(*caps: float | None) -> float | None:
    """The tightest of the caps that are set (``None``: no cap at all).

    A site's own cap, a per-run cap and a global cap all hold at once, so the
    smallest binds. A party can lower a cap this way, never raise one.
    """
    set_caps = [float(c) for c in caps if c is not None]
    for c in set_caps:
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"epsilon cap={c!r}: must be a finite number > 0")
    return min(set_caps) if set_caps else None


def check_budget(
    *,
    spent: Iterable[GaussianRelease | Sequence[float]],
    planned: Iterable[GaussianRelease | Sequence[float]],
    cap: float | None,
    delta: float,
    accountant: str,
    memo: EpsilonMemo | None = None,
) -> BudgetCheck:
    """Whether ``planned`` releases fit under ``cap`` on top of ``spent`` ones.

    ``spent`` is the site's whole history; both ε values are cumulative.
    ``memo``: where ε is looked up first (a pure function of the history, so
    the answer is the same with or without it).
    """
    spent, planned = list(spent), list(planned)
    eps = memo if memo is not None else EpsilonMemo(maxsize=0)  # 0: computes every call
    after = eps(spent + planned, delta, accountant)
    if cap is None or after <= cap:
        return BudgetCheck(allowed=True, after=after, cap=cap)
    before = eps(spent, delta, accountant)
    return BudgetCheck(allowed=False, after=after, cap=cap, spent=before)
