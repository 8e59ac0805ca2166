"""Audit a run directory from its raw ledger rows: :func:`audit_run`.

Trusts nothing the run printed. It verifies the hash chains (the server's
ledger and, where present, each site's), checks that every mirrored release
matches the site's own row, recomputes each site's ε per level and in total
with three accountants (RDP and PRV from Opacus, PLD from dp-accounting), and
compares with every ε the run reported. What it finds goes into
:class:`~privacy.report.AuditReport`; rendering is elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from privacy.accounting import ACCOUNTANTS, EpsilonMemo, GaussianRelease
from privacy.empirical_audit import check_empirical
from privacy.ledger import LEDGER_FILE, Charge, Ledger, LedgerError, LedgerRow
from privacy.report import AuditReport, Finding, SiteAudit

__all__ = ["AuditError", "audit_run", "THRESHOLDS"]

# Where a guarantee, though computed correctly, stops meaning much.
THRESHOLDS = {
    "min_records": 100,         # a site with fewer records: per-record ε hides little
    "meaningless_epsilon": 10.0,  # e^10 ≈ 22 000: the odds bound is vacuous
    "min_noise_multiplier": 0.3,
    "accountant_disagreement": 0.05,  # PRV vs PLD, relative
}
SECURE_GENERATOR_IDS = ("os-csprng",)
REPORTED_TOLERANCE = 1e-6  # relative: same history, same accountant, same answer
PACKAGES = ("opacus", "dp-accounting", "flwr", "torch", "numpy", "scipy")


class AuditError(RuntimeError):
    """The run directory cannot be audited at all (no ledger, unreadable files)."""


@dataclass
class _Run:
    path: Path
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    config_hash: str | None
    evaluates: bool


@dataclass
class _SiteRows:
    charges: list[LedgerRow] = field(default_factory=list)   # this run, server mirror + site-only
    lifetime: list[Charge] | None = None                       # the site's own ledger, all runs


def _read_run(path: Path) -> _Run:
    summary_file, metrics_file, config_file = (path / "summary.json", path / "metrics.jsonl",
                                               path / "config.yaml")
    try:
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        rounds = [json.loads(line) for line in metrics_file.read_text().splitlines()
                  if line.strip()] if metrics_file.exists() else []
    except (OSError, json.JSONDecodeError) as ex:
        raise AuditError(f"{path}: cannot read the run's files: {ex}") from ex
    config_hash, evaluates = None, False
    if config_file.exists():
        text = config_file.read_text()
        config_hash = hashlib.sha256(text.encode()).hexdigest()
        evaluates = any(r.get("federated_evaluation") for r in rounds)
    return _Run(path, summary, rounds, config_hash, evaluates)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _history(charges: Iterable[Charge]) -> list[GaussianRelease]:
    return [c.release() for c in charges]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _check_sites(run: _Run, server_rows: list[LedgerRow], findings: list[Finding],
                 sites_dir: Path | None = None) -> tuple[dict[str, _SiteRows], dict[str, str]]:
    """Group this run's releases by site; cross-check each site's own ledger.

    Site ledgers are read from ``sites_dir/NAME/ledger.sqlite`` (default: the
    run directory's ``sites/``, where a simulation keeps them; a deployment's
    sites keep theirs in their own ``state-dir``).
    """
    sites: dict[str, _SiteRows] = {}
    for row in server_rows:
        sites.setdefault(row.charge.site, _SiteRows()).charges.append(row)
    run_ids = {r.charge.run_id for r in server_rows}
    checked: dict[str, str] = {}
    sites_dir = sites_dir if sites_dir is not None else run.path / "sites"
    for folder in sorted(p for p in sites_dir.glob("*") if (p / LEDGER_FILE).exists()):
        name = folder.name
        try:
            with Ledger.open(folder / LEDGER_FILE, create=False) as site_ledger:
                problems = site_ledger.verify()
                own = site_ledger.rows()
        except LedgerError as ex:
            findings.append(Finding("error", "site_ledger_unreadable", str(ex), site=name))
            continue
        checked[name] = str(folder / LEDGER_FILE)
        for p in problems:
            findings.append(Finding("error", "site_chain_broken",
                                    f"site ledger {folder / LEDGER_FILE}: {p}", name, p.seq))
        entry = sites.setdefault(name, _SiteRows())
        entry.lifetime = [r.charge for r in own if r.charge.site == name]
        by_ref = {f"{name}#{r.seq}:{r.hash}": r for r in own}
        mirrored = set()
        for row in entry.charges:
            if row.charge.level == "client" and row.charge.source is None:
                continue  # the server's own client-level release: no site row to match
            src = by_ref.get(row.charge.source or "")
            if src is None:
                findings.append(Finding("error", "mirror_unmatched",
                                        f"server row {row.seq} cites {row.charge.source!r}, "
                                        "which the site's ledger does not hold", name, row.seq))
                continue
            mirrored.add(src.seq)
            for f in ("noise_multiplier", "sample_rate", "steps", "clipping_norm", "delta",
                      "sampling", "relation", "run_id", "level"):
                if getattr(src.charge, f) != getattr(row.charge, f):
                    findings.append(Finding(
                        "error", "mirror_mismatch",
                        f"server row {row.seq} says {f}={getattr(row.charge, f)!r}, the site's "
                        f"row {src.seq} says {getattr(src.charge, f)!r}", name, row.seq))
        # Charged at the site but never received by the server (a crash, a lost
        # reply): the data was still used, so it counts.
        extra = [r for r in own if r.seq not in mirrored and r.charge.run_id in run_ids]
        if extra:
            entry.charges.extend(extra)
            findings.append(Finding(
                "info", "unreported_charges",
                f"{len(extra)} release(s) charged at the site were never received by the "
                "server (e.g. a crash after charging); they are counted", name))
    return sites, checked


def _per_row_claims(site: str, rows: list[LedgerRow], delta: float, eps: EpsilonMemo,
                    findings: list[Finding]) -> tuple[list[int], list[float]]:
    """Recompute the cumulative ε after each row; flag claims below it.

    Returns the rounds and the cumulative ε (run's accountant) after each.
    """
    rounds: list[int] = []
    curve: list[float] = []
    seen: list[Charge] = []
    for row in sorted(rows, key=lambda r: (r.charge.round, r.seq)):
        c = row.charge
        seen.append(c)
        same_level = [x for x in seen if x.level == c.level]
        acc = c.accountant if c.accountant in ACCOUNTANTS else "prv"
        recomputed = eps(_history(same_level), c.delta, acc)
        if c.epsilon_reported is not None and \
                c.epsilon_reported < recomputed * (1 - REPORTED_TOLERANCE):
            findings.append(Finding(
                "error", "reported_below_recomputed",
                f"row {row.seq} (round {c.round}) reports epsilon={c.epsilon_reported:.4f} "
                f"({acc}, delta={c.delta:g}); recomputed from the ledger: {recomputed:.4f}",
                site, row.seq))
        if c.level == "sample" and (not rounds or rounds[-1] != c.round):
            rounds.append(c.round)
            curve.append(eps(_history(x for x in seen if x.level == "sample"), delta, acc))
    return rounds, curve


def _guarantee_findings(site: str, rows: list[LedgerRow], eps: dict[str, float | None],
                        findings: list[Finding]) -> None:
    warned: set[str] = set()

    def once(code: str, message: str, seq: int) -> None:
        if code not in warned:
            warned.add(code)
            findings.append(Finding("warning", code, message, site, seq))

    for row in rows:
        c = row.charge
        if c.sampling != "poisson":
            once("no_poisson_sampling",
                 f"sampling={c.sampling!r}: no Poisson guarantee; accounted without "
                 "amplification (q = 1 per step)", row.seq)
        elif c.sample_rate >= 1.0:
            once("sampling_rate_one", "sampling rate 1: every record in every step, "
                 "no amplification by sampling", row.seq)
        if c.num_records is not None and c.num_records < THRESHOLDS["min_records"]:
            once("few_records", f"only {c.num_records} records: a per-record guarantee "
                 "says little about a group this small", row.seq)
        if c.noise_generator.split(":")[0] not in SECURE_GENERATOR_IDS:
            once("insecure_noise", f"noise from {c.noise_generator!r}: not a "
                 "cryptographically secure generator (set privacy.noise_generator=secure)",
                 row.seq)
        if c.noise_multiplier < THRESHOLDS["min_noise_multiplier"]:
            once("tiny_sigma", f"noise_multiplier={c.noise_multiplier:g}: so little noise "
                 "that the guarantee is nominal", row.seq)
    worst = max((v for v in eps.values() if v is not None), default=0.0)
    if worst > THRESHOLDS["meaningless_epsilon"]:
        findings.append(Finding("warning", "meaningless_epsilon",
                                f"epsilon={worst:.2f} > {THRESHOLDS['meaningless_epsilon']:g}: "
                                "no meaningful guarantee", site))
    prv, pld = eps.get("prv"), eps.get("pld")
    if prv is not None and pld is not None and math.isfinite(prv) and pld > 0 and \
            abs(prv - pld) / pld > THRESHOLDS["accountant_disagreement"]:
        findings.append(Finding("warning", "accountants_disagree",
                                f"PRV {prv:.4f} and PLD {pld:.4f} differ by more than "
                                f"{THRESHOLDS['accountant_disagreement']:.0%}", site))


def _audit_site(name: str, rows: _SiteRows, run: _Run, delta: float, accountant: str,
                eps: EpsilonMemo, findings: list[Finding]) -> SiteAudit:
    charges = [r.charge for r in rows.charges]
    levels = {lvl: eps.all(_history(c for c in charges if c.level == lvl), delta)
              for lvl in sorted({c.level for c in charges})}
    total = eps.all(_history(charges), delta)
    recomputed = eps(_history(c for c in charges if c.level == "sample"), delta, accountant)
    reported = [c.epsilon_reported for c in charges if c.epsilon_reported is not None]
    summary_eps = run.summary.get("epsilon_per_client", {}).get(name)
    if summary_eps is not None:
        reported.append(float(summary_eps))
        if float(summary_eps) < recomputed * (1 - REPORTED_TOLERANCE):
            findings.append(Finding("error", "reported_below_recomputed",
                                    f"summary.json reports epsilon={summary_eps:.4f}; "
                                    f"recomputed: {recomputed:.4f}", name))
    for rec in run.rounds:
        for c in rec.get("clients", []):
            if c.get("site") == name and c.get("epsilon") is not None:
                reported.append(float(c["epsilon"]))
    rounds, curve = _per_row_claims(name, rows.charges, delta, eps, findings)
    if curve and max(reported, default=0.0) < curve[-1] * (1 - REPORTED_TOLERANCE):
        findings.append(Finding("error", "reported_below_recomputed",
                                f"the run reported at most {max(reported, default=0.0):.4f}, "
                                f"recomputed {curve[-1]:.4f}", name))
    _guarantee_findings(name, rows.charges, total, findings)
    caps = [c.epsilon_cap for c in charges if c.epsilon_cap is not None]
    cap = min(caps) if caps else None
    life = rows.lifetime if rows.lifetime is not None else charges
    spent = eps(_history(life), delta, accountant)
    if cap is not None and spent > cap * (1 + REPORTED_TOLERANCE):
        findings.append(Finding("error", "cap_exceeded",
                                f"spent epsilon={spent:.4f} exceeds the cap {cap:g}", name))
    records = [c.num_records for c in charges if c.num_records is not None]
    return SiteAudit(
        site=name, releases=len(charges), levels=levels, total=total, accountant=accountant,
        reported=max(reported) if reported else None, recomputed=recomputed, cap=cap,
        spent=spent, remaining=None if cap is None else max(0.0, cap - spent),
        num_records=min(records) if records else None,
        noise_generators=sorted({c.noise_generator for c in charges}),
        rounds=rounds, epsilon_by_round=curve,
    )


def _accuracy_curve(run: _Run, sites: list[SiteAudit]) -> list[tuple[int, float, float]]:
    out = []
    for rec in run.rounds:
        acc = rec.get("central", {}).get("accuracy")
        rnd = rec.get("round")
        if acc is None or rnd is None:
            continue
        eps = [s.epsilon_by_round[s.rounds.index(rnd)] for s in sites if rnd in s.rounds]
        out.append((int(rnd), float(acc), max(eps, default=0.0)))
    return out


def _head_findings(recorded: dict[str, Any], count: int, head: str,
                   rows: list[LedgerRow]) -> list[Finding]:
    """Compare the ledger with the head ``summary.json`` recorded when the run ended.

    The hashes are unkeyed, so whoever can write the file can re-chain an edited
    ledger; the recorded head is the anchor that catches that (and truncation).
    """
    want_rows, want_head = recorded.get("rows"), recorded.get("head")
    if (want_rows, want_head) == (count, head):
        return []
    msg = (f"summary.json recorded {want_rows} rows ending in {str(want_head)[:12]}...; "
           f"the ledger has {count} ending in {head[:12]}...")
    if isinstance(want_rows, int) and want_rows < count:
        at = next((r for r in rows if r.seq == want_rows), None)
        if at is not None and at.hash == want_head:
            return [Finding("warning", "ledger_grew", f"{msg} (rows appended after the run "
                                                       "ended; the recorded prefix is intact)",
                            seq=want_rows + 1)]
    seq = want_rows if isinstance(want_rows, int) and 0 < want_rows <= count else count
    return [Finding("error", "ledger_head_mismatch", f"{msg}: the ledger was truncated, "
                    "re-chained or replaced", seq=seq)]


def audit_run(run_dir: str | Path, *, delta: float | None = None,
              sites_dir: str | Path | None = None) -> AuditReport:
    """Audit the run in ``run_dir`` (see the module docstring).

    ``delta`` defaults to the run's δ (``summary.json``, else the ledger's rows).
    ``sites_dir``: a folder of site state dirs (``NAME/ledger.sqlite``) to
    cross-check, when they are not in ``run_dir/sites`` (a deployment's sites).
    """
    path = Path(run_dir)
    ledger_file = path / LEDGER_FILE
    if not ledger_file.exists():
        raise AuditError(f"{path}: no {LEDGER_FILE}; is this a fedpriv run directory?")
    run = _read_run(path)
    findings: list[Finding] = []
    try:
        with Ledger.open(ledger_file, create=False) as ledger:
            problems = ledger.verify()
            rows = ledger.rows() if not any("invalid content" in p.problem
                                            for p in problems) else []
            count, head = ledger.head()
    except LedgerError as ex:
        raise AuditError(str(ex)) from ex
    for p in problems:
        findings.append(Finding("error", "chain_broken", str(p), seq=p.seq))
    recorded = run.summary.get("ledger") or {}
    if recorded:
        findings.extend(_head_findings(recorded, count, head, rows))
    run_delta = delta if delta is not None else run.summary.get("delta") or (
        rows[0].charge.delta if rows else 1e-5)
    if not 0 < float(run_delta) < 1:
        raise AuditError(f"delta={run_delta!r}: must be in (0, 1)")
    accountant = str(run.summary.get("accountant", "opacus-prv")).removeprefix("opacus-")
    if accountant not in ACCOUNTANTS:
        accountant = "prv"
    site_rows, checked = _check_sites(run, rows, findings,
                                      Path(sites_dir) if sites_dir is not None else None)
    memo = EpsilonMemo()
    sites = [_audit_site(name, sr, run, float(run_delta), accountant, memo, findings)
             for name, sr in sorted(site_rows.items()) if sr.charges]
    # audit=sample / audit=client: the canaries' lower bound against the claimed epsilon.
    client_releases = [(r.charge.round, r.charge.noise_multiplier) for r in rows
                       if r.charge.level == "client" and r.charge.source is None]
    empirical, found = check_empirical(path, sites, delta=float(run_delta), summary=run.summary,
                                       client_releases=client_releases, accountant=accountant,
                                       memo=memo)
    findings.extend(found)
    if run.evaluates:
        findings.append(Finding(
            "warning", "evaluation_not_private",
            "federated evaluation sent exact accuracy/loss on each site's validation split; "
            "those releases are not noised and not in the ledger"))
    stop = run.summary.get("stop_reason")
    if stop and stop != "completed":
        findings.append(Finding("info", "stopped_early",
                                f"stop_reason={stop}: {run.summary.get('stop_detail', '')}"))
    return AuditReport(
        run_dir=str(path), delta=float(run_delta), accountant=accountant, ledger_rows=count,
        ledger_head=head, chain_ok=not problems, chain_problems=[str(p) for p in problems],
        sites=sites, findings=findings, accuracy_by_round=_accuracy_curve(run, sites),
        stop_reason=stop, config_hash=run.config_hash, versions=_versions(),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), site_ledgers=checked,
        empirical=empirical,
    )
