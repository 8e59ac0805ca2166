"""Render a privacy audit (:class:`privacy.report.AuditReport`) as JSON, Markdown, HTML and plots.

Plots are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, so no
pyplot global state is touched. The HTML report is one self-contained file: inline
CSS, plots as ``data:`` URIs, no scripts, nothing fetched (a Content-Security-Policy
forbids it), so it reads the same offline or attached to a ticket.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from privacy.empirical_audit import BUG_CAUSES
from privacy.report import AuditReport, EmpiricalSummary, Finding, SiteAudit

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "plot_epsilon_by_round",
    "plot_accuracy_vs_epsilon",
    "render_json",
    "render_markdown",
    "render_html",
    "browser_screenshot",
    "browser_dump_dom",
]

EPSILON_PLOT = "epsilon_by_round.png"
ACCURACY_PLOT = "accuracy_vs_epsilon.png"
LEVEL_ORDER = ("sample", "client", "local", "statistics")
ACCOUNTANT_ORDER = ("rdp", "prv", "pld")
SEVERITY_ORDER = ("error", "warning", "info")
ABSENT = "—"  # the site has no releases at that level (``n/a``: the accountant cannot say)
_EPS_ALT = "Cumulative ε after each round, one line per site; dashed lines are the sites' caps"
_ACC_ALT = "Central accuracy against the largest cumulative ε of any site after each round"


# --------------------------------------------------------------------------- formatting


def _eps(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.3f}"


def _opt(value: object) -> str:
    return "n/a" if value is None else str(value)


def _order(keys: Iterable[str], preferred: Sequence[str]) -> list[str]:
    present = set(keys)
    return [k for k in preferred if k in present] + sorted(present - set(preferred))


def _columns(report: AuditReport) -> tuple[list[str], list[str]]:
    """The privacy levels and accountants present in any site, in a fixed order."""
    levels = _order((level for s in report.sites for level in s.levels), LEVEL_ORDER)
    tables = [t for s in report.sites for t in (*s.levels.values(), s.total)]
    return levels, _order((acc for t in tables for acc in t), ACCOUNTANT_ORDER)


_TAIL_HEAD = ["reported", "recomputed", "spent", "cap", "remaining", "noise"]


def _generators(site: SiteAudit) -> str:
    """The generators' short ids (the text before ``:``; findings quote them in full)."""
    return ", ".join(sorted({g.split(":")[0] for g in site.noise_generators})) or "n/a"


def _site_cells(site: SiteAudit, levels: list[str], accountants: list[str]) -> list[str]:
    cells = [site.site, str(site.releases), _opt(site.num_records)]
    for level in levels:
        by_acc = site.levels.get(level)
        cells += [ABSENT if by_acc is None else _eps(by_acc.get(a)) for a in accountants]
    cells += [_eps(site.total.get(a)) for a in accountants]
    cells += [_eps(v) for v in (site.reported, site.recomputed, site.spent, site.cap)]
    cells += [_eps(site.remaining), _generators(site)]
    return cells


def _verdict(report: AuditReport) -> tuple[str, list[str]]:
    """``PASS``/``FAIL`` and the reasons for it."""
    count = {s: sum(f.severity == s for f in report.findings) for s in SEVERITY_ORDER}
    if report.ok:
        why = ["ledger hash chain intact", "no error findings"]
        if count["warning"]:
            why.append(f"{count['warning']} warning(s) to review")
        return "PASS", why
    why = []
    if not report.chain_ok:
        n = len(report.chain_problems)
        why.append("ledger hash chain is broken" + (f" ({n} problem(s))" if n else ""))
    if count["error"]:
        why.append(f"{count['error']} error finding(s)")
    return "FAIL", why


def _summary(report: AuditReport) -> list[tuple[str, str]]:
    return [
        ("run directory", report.run_dir),
        ("created", report.created_at),
        ("δ", f"{report.delta:g}"),
        ("accountant", report.accountant),
        ("ledger rows", str(report.ledger_rows)),
        ("ledger head", report.ledger_head),
        ("hash chain", "intact" if report.chain_ok else "BROKEN"),
        ("stop reason", _opt(report.stop_reason)),
        ("config hash", _opt(report.config_hash)),
    ]


def _grouped(findings: list[Finding]) -> list[tuple[str, list[Finding]]]:
    order = _order((f.severity for f in findings), SEVERITY_ORDER)
    return [(sev, [f for f in findings if f.severity == sev]) for sev in order]


def _where(finding: Finding) -> str:
    parts = [] if finding.site is None else [f"site {finding.site}"]
    return ", ".join(parts + ([] if finding.seq is None else [f"ledger row {finding.seq}"]))


def _empirical_rows(e: EmpiricalSummary, accountant: str) -> list[tuple[str, str]]:
    """The canary audit's figures, ε_lb beside the accountants' ε."""
    confidence = f"{1 - e.significance:.0%}"
    by_acc = _order(e.claimed_by_accountant, ACCOUNTANT_ORDER)
    return [
        (f"empirical lower bound ε_lb ({e.level}-level canaries; holds with probability "
         f"{confidence})", _eps(e.epsilon_lb)),
        (f"claimed ε ({accountant}; the largest of the sites with canaries: "
         f"{_opt(e.claimed_site)})" if e.level != "client" else
         f"claimed ε ({accountant}; client level: every round's release, composed, as for a "
         "client in all of them)", _eps(e.claimed_epsilon)),
        *[(f"claimed ε, {a}", _eps(e.claimed_by_accountant[a])) for a in by_acc],
        (f"ceiling: the largest ε_lb this run could show (m = {e.m})", _eps(e.ceiling)),
        ("Gaussian-DP estimate (an estimate, not a bound)", _eps(e.gdp_epsilon_estimate)),
        ("guesses", f"{e.correct} right of {e.guesses} ({e.m} canaries, {e.members} in)"),
    ]


def _empirical_verdict(e: EmpiricalSummary) -> str:
    if e.claimed_epsilon is None:
        return ("No client-level release in the ledger: no claim to test." if
                e.level == "client" else
                "No site with canaries has a sample-level release: no claim to test.")
    if e.epsilon_lb > e.claimed_epsilon:
        return (f"ε_lb > claimed ε: the empirical lower bound exceeds the claimed ε, evidence "
                f"of a privacy bug ({BUG_CAUSES}).")
    ceiling = "" if e.claimed_epsilon <= e.ceiling else (
        " The claimed ε is above the ceiling: this run cannot refute it.")
    return ("ε_lb ≤ claimed ε: this run did not refute the claim (a lower bound below the "
            "claim is no evidence that the claim holds)." + ceiling)


# --------------------------------------------------------------------------- plots


def _new_figure(width: float = 7.0, height: float = 4.2) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" tag: the same report gives the same bytes.
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _no_data(title: str) -> Figure:
    fig = _new_figure(3.2, 1.6)
    fig.text(0.5, 0.62, "no data", ha="center", va="center", fontsize=16, color="0.35")
    fig.text(0.5, 0.3, title, ha="center", va="center", fontsize=8, color="0.45")
    return fig


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.nan


def _epsilon_figure(report: AuditReport) -> Figure:
    for s in report.sites:
        if len(s.rounds) != len(s.epsilon_by_round):
            raise ValueError(
                f"site {s.site!r}: {len(s.rounds)} rounds but "
                f"{len(s.epsilon_by_round)} epsilon_by_round values"
            )
    series = [s for s in report.sites if any(math.isfinite(e) for e in s.epsilon_by_round)]
    if not series:
        return _no_data("cumulative ε by round")
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure()
    ax = fig.add_subplot()
    # A cap far above the curves would flatten them: show caps up to twice the
    # largest ε, and name the others in the legend.
    top = max(_finite(e) for s in series for e in s.epsilon_by_round)
    for i, s in enumerate(series):
        colour = f"C{i % 10}"
        ys = [_finite(e) for e in s.epsilon_by_round]
        ax.plot(s.rounds, ys, marker="o", markersize=3, color=colour, label=s.site)
        if s.cap is not None and math.isfinite(s.cap):
            if s.cap <= 2 * top:
                ax.axhline(s.cap, linestyle="--", linewidth=1, color=colour,
                           label=f"{s.site} cap")
            else:
                ax.plot([], [], linestyle="--", linewidth=1, color=colour,
                        label=f"{s.site} cap {s.cap:g} (off scale)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"cumulative ε at δ={report.delta:g} ({report.accountant})")
    ax.set_title("Privacy loss by round")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=max(1, math.ceil(len(series) / 12)))
    return fig


def _accuracy_figure(report: AuditReport) -> Figure:
    points = [(r, acc, e) for r, acc, e in report.accuracy_by_round
              if math.isfinite(e) and math.isfinite(acc)]
    if not points:
        return _no_data("accuracy against ε")
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot([p[2] for p in points], [p[1] for p in points], marker="o", color="C0")
    for r, acc, e in {points[0], points[-1]}:
        ax.annotate(f"round {r}", (e, acc), textcoords="offset points", xytext=(6, -12),
                    fontsize="small")
    ax.set_xlabel(f"largest cumulative ε at δ={report.delta:g} ({report.accountant})")
    ax.set_ylabel("central accuracy")
    ax.set_title("Accuracy against privacy loss")
    ax.margins(0.1)
    ax.grid(alpha=0.3)
    return fig


def plot_epsilon_by_round(report: AuditReport) -> bytes:
    """PNG of each site's cumulative ε after each round, with its cap as a dashed line.

    Parameters
    ----------
    report : AuditReport
        The audit; uses each site's ``rounds``, ``epsilon_by_round`` and ``cap``.
        Non-finite ε values are left out of the line.

    Returns
    -------
    bytes
        A PNG. With no site or no finite value it is a small image saying "no data".

    Raises
    ------
    ValueError
        If a site's ``rounds`` and ``epsilon_by_round`` differ in length.
    """
    return _png(_epsilon_figure(report))


def plot_accuracy_vs_epsilon(report: AuditReport) -> bytes:
    """PNG of central accuracy against the largest ε of any site, one point per round.

    Parameters
    ----------
    report : AuditReport
        The audit; uses ``accuracy_by_round`` (round, accuracy, ε). Points with a
        non-finite value are left out; the first and last rounds are labelled.

    Returns
    -------
    bytes
        A PNG. Without rounds it is a small image saying "no data".
    """
    return _png(_accuracy_figure(report))


# --------------------------------------------------------------------------- JSON / Markdown


def render_json(report: AuditReport) -> str:
    """The report as indented, strict JSON (non-finite floats are ``null``)."""
    return json.dumps(report.to_json(), indent=2, allow_nan=False)


def _md(text: str) -> str:
    """Plain text safe in a Markdown table cell (no raw HTML, no cell breaks)."""
    return " ".join(html.escape(text, quote=False).replace("|", "\\|").split())


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(_md(h) for h in head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]


def _site_head(levels: list[str], accountants: list[str]) -> list[str]:
    grid = [f"{lv} {a}" for lv in [*levels, "total"] for a in accountants]
    return ["site", "releases", "records", *grid, *_TAIL_HEAD]


def render_markdown(report: AuditReport, plots_dir: Path | None = None) -> str:
    """The audit as a Markdown document.

    Parameters
    ----------
    report : AuditReport
        The audit to show.
    plots_dir : Path or None
        Where to write ``epsilon_by_round.png`` and ``accuracy_vs_epsilon.png``
        (created if missing). They are linked relative to ``plots_dir.parent``,
        the folder the Markdown is meant to be saved in. ``None``: no plots.

    Returns
    -------
    str
        Verdict, run facts, a per-site ε table (``n/a`` where an accountant
        cannot analyse the releases, ``∞`` for an unbounded ε), findings by
        severity and library versions.
    """
    verdict, why = _verdict(report)
    lines = [f"# Privacy audit: {_md(report.run_dir)}", "",
             f"**Verdict: {verdict}** ({_md('; '.join(why))})", ""]
    for key, value in _summary(report):
        lines.append(f"- **{_md(key)}:** {_md(value)}")
        if key == "hash chain":
            lines += [f"  - {_md(p)}" for p in report.chain_problems]
    lines += [f"- **site ledger checked:** {_md(s)}: {_md(p)}"
              for s, p in sorted(report.site_ledgers.items())]
    lines += ["", "## Sites", ""]
    if report.sites:
        levels, accountants = _columns(report)
        rows = [_site_cells(s, levels, accountants) for s in report.sites]
        lines += _md_table(_site_head(levels, accountants), rows)
        lines += ["", f"ε at δ={report.delta:g}. n/a: the accountant cannot analyse these "
                      f"releases; {ABSENT}: no releases at that level; ∞: unbounded."]
    else:
        lines.append("No sites.")
    if report.empirical is not None:
        lines += ["", "## Empirical audit (canaries)", ""]
        lines += _md_table(["", f"ε at δ={report.empirical.delta:g}"],
                           [list(r) for r in _empirical_rows(report.empirical,
                                                             report.accountant)])
        lines += ["", _md(_empirical_verdict(report.empirical))]
    if plots_dir is not None:
        plots_dir.mkdir(parents=True, exist_ok=True)
        (plots_dir / EPSILON_PLOT).write_bytes(plot_epsilon_by_round(report))
        (plots_dir / ACCURACY_PLOT).write_bytes(plot_accuracy_vs_epsilon(report))
        rel = quote(plots_dir.name)
        lines += ["", "## Plots", "", f"![{_EPS_ALT}]({rel}/{EPSILON_PLOT})", "",
                  f"![{_ACC_ALT}]({rel}/{ACCURACY_PLOT})"]
    lines += ["", "## Findings", ""]
    for severity, findings in _grouped(report.findings):
        lines += [f"### {_md(severity)} ({len(findings)})", ""]
        for f in findings:
            where = _where(f)
            lines.append(f"- **{_md(f.code)}**: {_md(f.message)}"
                         + (f" ({_md(where)})" if where else ""))
        lines.append("")
    if not report.findings:
        lines += ["No findings.", ""]
    lines += ["## Library versions", ""]
    lines += _md_table(["library", "version"], sorted(map(list, report.versions.items())))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- HTML

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1b1b1b; background: #fff; }
h1 { font-size: 1.5em; word-break: break-all; }
.verdict { padding: .8em 1em; border-radius: 6px; font-size: 1.2em; color: #fff; }
.pass { background: #1e7d32; } .fail { background: #c62828; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
#sites td:first-child { white-space: nowrap; }
th { background: #f0f0f0; }
.scroll { overflow-x: auto; }
tr.error td { background: #fdecea; } tr.warning td { background: #fff6e0; }
code { font-size: .9em; word-break: break-all; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; }
.note { color: #555; font-size: .85em; }
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _cells(values: Iterable[str], first_is_text: bool = True) -> str:
    out = []
    for i, v in enumerate(values):
        cls = "" if (i == 0 and first_is_text) else ' class="num"'
        out.append(f"<td{cls}>{_e(v)}</td>")
    return "".join(out)


def _html_sites(report: AuditReport) -> str:
    if not report.sites:
        return "<p>No sites.</p>"
    levels, accountants = _columns(report)
    n = len(accountants)
    top = ['<th rowspan="2">site</th><th rowspan="2">releases</th><th rowspan="2">records</th>']
    top += [f'<th colspan="{n}">{_e(lv)}</th>' for lv in [*levels, "total"]]
    top += [f'<th rowspan="2">{_e(h)}</th>' for h in _TAIL_HEAD]
    sub = "".join(f"<th>{_e(a)}</th>" for _ in [*levels, "total"] for a in accountants)
    body = "".join(
        f"<tr>{_cells(_site_cells(s, levels, accountants)[:-1])}"
        f"<td title=\"{_e(' | '.join(s.noise_generators))}\">{_e(_generators(s))}</td></tr>"
        for s in report.sites
    )
    return (f'<div class="scroll"><table id="sites"><thead><tr>{"".join(top)}</tr>'
            f"<tr>{sub}</tr></thead><tbody>{body}</tbody></table></div>"
            f'<p class="note">ε at δ={report.delta:g}. n/a: the accountant cannot analyse '
            f"these releases; {ABSENT}: no releases at that level; ∞: unbounded.</p>")


def _html_findings(report: AuditReport) -> str:
    if not report.findings:
        return "<p>No findings.</p>"
    rows = "".join(
        f'<tr class="{_e(f.severity)}"><td>{_e(f.severity)}</td><td><code>{_e(f.code)}</code>'
        f"</td><td>{_e(_opt(f.site))}</td><td>{_e(_opt(f.seq))}</td><td>{_e(f.message)}</td></tr>"
        for _, group in _grouped(report.findings) for f in group
    )
    return ('<table id="findings"><thead><tr><th>severity</th><th>code</th><th>site</th>'
            f"<th>ledger row</th><th>message</th></tr></thead><tbody>{rows}</tbody></table>")


def _html_empirical(report: AuditReport) -> str:
    e = report.empirical
    if e is None:
        return ""
    rows = "".join(f"<tr><th>{_e(k)}</th><td class=\"num\">{_e(v)}</td></tr>"
                   for k, v in _empirical_rows(e, report.accountant))
    return (f'<h2>Empirical audit (canaries)</h2><table id="empirical"><thead><tr><th></th>'
            f"<th>ε at δ={_e(f'{e.delta:g}')}</th></tr></thead><tbody>{rows}</tbody></table>"
            f'<p class="note" id="empirical-verdict">{_e(_empirical_verdict(e))}</p>')


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}"></figure>'


def render_html(report: AuditReport) -> str:
    """The audit as one self-contained HTML5 page (same content as the Markdown).

    Inline CSS, both plots embedded as ``data:`` PNGs, no script and no external
    resource, so it reads offline. Every piece of report text is HTML-escaped.

    Parameters
    ----------
    report : AuditReport
        The audit to show.

    Returns
    -------
    str
        The page: a red or green verdict banner, run facts, ``<table id="sites">``
        (one body row per site), the plots, ``<table id="findings">`` and
        ``<table id="versions">``.
    """
    verdict, why = _verdict(report)
    why_text = "; ".join(why)
    facts = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in _summary(report))
    facts += "".join(f"<tr><th>site ledger: {_e(s)}</th><td><code>{_e(p)}</code></td></tr>"
                     for s, p in sorted(report.site_ledgers.items()))
    problems = "".join(f"<li>{_e(p)}</li>" for p in report.chain_problems)
    versions = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>"
                       for k, v in sorted(report.versions.items()))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Privacy audit: {_e(report.run_dir)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Privacy audit: {_e(report.run_dir)}</h1>
<p class="verdict {verdict.lower()}" id="verdict"><strong>{verdict}</strong>: {_e(why_text)}</p>
<table id="run">{facts}</table>
{f'<p>Hash chain problems:</p><ul id="chain-problems">{problems}</ul>' if problems else ''}
<h2>Sites</h2>
{_html_sites(report)}
{_html_empirical(report)}
<h2>Plots</h2>
{_img(plot_epsilon_by_round(report), _EPS_ALT)}
{_img(plot_accuracy_vs_epsilon(report), _ACC_ALT)}
<h2>Findings</h2>
{_html_findings(report)}
<h2>Library versions</h2>
<table id="versions"><thead><tr><th>library</th><th>version</th></tr></thead>
<tbody>{versions}</tbody></table>
</body>
</html>
"""


# --------------------------------------------------------------------------- headless browser

_CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio",
)


def _find_chromium(chromium: str | None) -> str:
    names = [chromium] if chromium else ["chromium", "chromium-browser"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(
        f"Chromium not found (looked for {', '.join(names)}); "
        "install it with `apt-get install chromium`"
    )


def _run_chromium(args: list[str], *, chromium: str | None, timeout: float) -> str:
    """Run headless Chromium in a fresh profile and home; return its stdout.

    It runs in its own session so that, on timeout, the whole process group
    (browser, zygotes, renderers) is killed, not only the launcher. HOME points
    into the temporary profile because Chromium's crash handler otherwise writes
    to ``~/.config/chromium`` whatever ``--user-data-dir`` says.
    """
    exe = _find_chromium(chromium)
    with tempfile.TemporaryDirectory(prefix="fedpriv-chromium-") as tmp:
        home = Path(tmp)
        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_CACHE_HOME": str(home / ".cache")}
        cmd = [exe, *_CHROMIUM_FLAGS, f"--user-data-dir={home / 'profile'}", *args]
        with open(home / "out", "wb") as out, open(home / "err", "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env=env, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise TimeoutError(f"Chromium took over {timeout} s: {' '.join(cmd)}") from None
        stdout = (home / "out").read_text(errors="replace")
        stderr = (home / "err").read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"Chromium exited with {proc.returncode}: {stderr[-2000:]}")
    return stdout


def browser_dump_dom(html: Path, *, chromium: str | None = None, timeout: float = 60.0) -> str:
    """The DOM of ``html`` after a headless Chromium has loaded it (``--dump-dom``).

    Raises ``FileNotFoundError`` (with an install hint) when no Chromium is found.
    """
    return _run_chromium(["--dump-dom", html.resolve().as_uri()],
                         chromium=chromium, timeout=timeout)


def browser_screenshot(html: Path, png: Path, *, width: int = 1280, height: int = 1800,
                       chromium: str | None = None, timeout: float = 60.0) -> None:
    """Screenshot an HTML file with headless Chromium.

    Parameters
    ----------
    html : Path
        The page to open (as a ``file://`` URL).
    png : Path
        Where to write the screenshot (``width`` × ``height`` pixels, top of page).
    width, height : int
        The browser window size in CSS pixels.
    chromium : str or None
        The browser executable; by default ``chromium`` or ``chromium-browser`` on PATH.
    timeout : float
        Seconds before the browser and all its processes are killed.

    Raises
    ------
    FileNotFoundError
        No Chromium was found; the message says how to install it.
    ValueError
        ``width`` or ``height`` is not positive.
    TimeoutError, RuntimeError
        Chromium hung, failed, or wrote no screenshot.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"window size must be positive, got {width}x{height}")
    png = png.resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    _run_chromium([f"--screenshot={png}", f"--window-size={width},{height}",
                   html.resolve().as_uri()], chromium=chromium, timeout=timeout)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot to {png}")
