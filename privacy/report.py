"""The data of a privacy audit (built by :mod:`privacy.audit`, rendered by ``server.report``).

Plain dataclasses with a JSON form; no rendering and no I/O here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Finding", "SiteAudit", "EmpiricalSummary", "AuditReport"]

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One thing the auditor should know.

    ``error``: the run's privacy claim cannot be trusted as recorded (broken
    chain, a reported ε below the recomputed one, a cap exceeded); the audit
    exits non-zero. ``warning``: the guarantee holds as computed but is weak or
    rests on an assumption worth a look (few records, insecure noise generator,
    σ so small that ε is meaningless, no sampling amplification).
    """

    severity: str
    code: str
    message: str
    site: str | None = None
    seq: int | None = None


@dataclass
class SiteAudit:
    """One site (client) of the run, recomputed from the ledger's raw rows.

    ``levels`` maps each privacy level present (``sample``, ``client``,
    ``local``, ``statistics``) to ε by accountant (``rdp``, ``prv``, ``pld``;
    ``None`` where an accountant cannot analyse the releases). ``total``
    composes every release touching the site's records (record-level ε).
    ``reported`` is the largest ε the run claimed for the site; ``recomputed``
    the same quantity recomputed with the run's ``accountant``.
    ``spent``/``cap``/``remaining`` are lifetime figures at the site (all runs
    in the site's own ledger when it is available, else this run).
    ``epsilon_by_round`` is the cumulative recomputed ε after each round in
    ``rounds`` (run accountant).
    """

    site: str
    releases: int
    levels: dict[str, dict[str, float | None]]
    total: dict[str, float | None]
    accountant: str
    reported: float | None
    recomputed: float
    cap: float | None
    spent: float | None
    remaining: float | None
    num_records: int | None
    noise_generators: list[str]
    rounds: list[int] = field(default_factory=list)
    epsilon_by_round: list[float] = field(default_factory=list)


@dataclass
class EmpiricalSummary:
    """The canary audit of the run (``audit_empirical.json``), recomputed at the audit's δ.

    ``epsilon_lb`` is recomputed from the recorded scores and membership bits
    (``privacy.empirical.audit_from_scores``); ``recorded_epsilon_lb`` is what
    the run wrote. ``claimed_epsilon`` is the largest recomputed sample-level ε
    (run accountant) of the sites with canaries, ``claimed_site`` that site;
    ``claimed_by_accountant`` the same with each accountant. With ``level``
    ``client`` (canary clients inside client-level DP) the claim is every round's
    client-level release composed (``claimed_site`` is ``None``). ``ceiling`` is the
    largest ε_lb the run could show; ``gdp_epsilon_estimate`` is an estimate,
    not a bound (``None`` when infinite).
    """

    level: str
    m: int
    members: int
    guesses: int
    correct: int
    epsilon_lb: float
    ceiling: float
    gdp_epsilon_estimate: float | None
    significance: float
    delta: float
    claimed_epsilon: float | None
    claimed_site: str | None
    claimed_by_accountant: dict[str, float | None]
    recorded_epsilon_lb: float | None


@dataclass
class AuditReport:
    """Everything ``fedpriv audit`` shows, in one object."""

    run_dir: str
    delta: float
    accountant: str
    ledger_rows: int
    ledger_head: str
    chain_ok: bool
    chain_problems: list[str]
    sites: list[SiteAudit]
    findings: list[Finding]
    # (round, central accuracy, largest cumulative ε of any site after that round)
    accuracy_by_round: list[tuple[int, float, float]]
    stop_reason: str | None
    config_hash: str | None
    versions: dict[str, str]
    created_at: str
    site_ledgers: dict[str, str] = field(default_factory=dict)  # site -> path checked
    empirical: EmpiricalSummary | None = None  # the canary audit, when the run made one

    @property
    def ok(self) -> bool:
        return self.chain_ok and not any(f.severity == "error" for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite floats become ``None``)."""
        return {**_jsonable(asdict(self)), "ok": self.ok}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
