"""``fedpriv audit RUN_DIR [--delta D] [--format md|html|json] [--out PATH]``.

Exit status: 0 when the chain is intact and no error was found, 1 when the
audit found an error (a broken chain, a reported ε below the recomputed one, a
cap exceeded), 2 when the run directory cannot be audited at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedpriv audit",
        description="Verify a run's privacy ledger and recompute every epsilon "
                    "(RDP, PRV, PLD) from its raw rows.")
    p.add_argument("run_dir", type=Path, help="the run directory (holds ledger.sqlite)")
    p.add_argument("--delta", type=float, default=None,
                   help="delta for the recomputed epsilons (default: the run's)")
    p.add_argument("--sites", type=Path, default=None,
                   help="a folder of site state dirs (NAME/ledger.sqlite) to cross-check; "
                        "default: RUN_DIR/sites (a simulation's)")
    p.add_argument("--format", choices=("md", "html", "json"), default="md")
    p.add_argument("--out", type=Path, default=None,
                   help="write the report here (default: print md/json; html needs --out "
                        "or goes to RUN_DIR/audit.html)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from privacy.audit import AuditError, audit_run
    from server.report import render_html, render_json, render_markdown

    if args.delta is not None and not 0 < args.delta < 1:
        print(f"fedpriv audit: --delta={args.delta}: must be in (0, 1)", file=sys.stderr)
        return 2
    try:
        report = audit_run(args.run_dir, delta=args.delta, sites_dir=args.sites)
    except AuditError as ex:
        print(f"fedpriv audit: {ex}", file=sys.stderr)
        return 2
    out: Path | None = args.out
    if args.format == "html" and out is None:
        out = args.run_dir / "audit.html"
    if args.format == "json":
        text = render_json(report)
    elif args.format == "html":
        text = render_html(report)
    else:
        plots = (out.parent / f"{out.stem}_plots") if out is not None else None
        text = render_markdown(report, plots)
    if out is None:
        print(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"fedpriv audit: report written to {out}")
    errors = [f for f in report.findings if f.severity == "error"]
    verdict = "PASS" if report.ok else f"FAIL ({len(errors)} error(s))"
    print(f"fedpriv audit: {verdict}", file=sys.stderr)
    for f in errors:
        where = " ".join(x for x in (f"site {f.site}" if f.site else "",
                                     f"row {f.seq}" if f.seq else "") if x)
        print(f"  error [{f.code}] {where}: {f.message}", file=sys.stderr)
    return 0 if report.ok else 1
