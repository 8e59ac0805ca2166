"""Audit rendering (JSON, Markdown, HTML, plots) on AuditReport objects built by hand."""

import base64
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from privacy.report import AuditReport, Finding, SiteAudit
from server.report import (
    _accuracy_figure,
    _epsilon_figure,
    plot_accuracy_vs_epsilon,
    plot_epsilon_by_round,
    render_html,
    render_json,
    render_markdown,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TAB_BLUE = (0x1F / 255, 0x77 / 255, 0xB4 / 255)  # matplotlib's first colour, "C0"


def _site_a() -> SiteAudit:
    return SiteAudit(
        site="hospital-a", releases=12,
        levels={"sample": {"rdp": 1.23456, "prv": 1.2, "pld": None},
                "client": {"rdp": 0.5, "prv": 0.49, "pld": 0.48}},
        total={"rdp": 1.5, "prv": 1.45, "pld": None}, accountant="rdp",
        reported=1.2, recomputed=1.23456, cap=8.0, spent=1.23456, remaining=6.76544,
        num_records=1200, noise_generators=["secure"],
        rounds=[1, 2, 3], epsilon_by_round=[0.5, 0.9, 1.23456],
    )


def _site_b() -> SiteAudit:
    return SiteAudit(
        site="hospital-b", releases=5,
        levels={"sample": {"rdp": math.inf, "prv": None, "pld": None}},
        total={"rdp": math.inf, "prv": None, "pld": None}, accountant="rdp",
        reported=None, recomputed=math.inf, cap=3.0, spent=None, remaining=None,
        num_records=None, noise_generators=[],
        rounds=[1, 2, 3], epsilon_by_round=[0.7, 1.4, 2.1],
    )


def _site_c(name: str = "clinic-c") -> SiteAudit:
    return SiteAudit(
        site=name, releases=3, levels={"sample": {"rdp": 0.25, "prv": 0.24, "pld": 0.24}},
        total={"rdp": 0.25, "prv": 0.24, "pld": 0.24}, accountant="rdp",
        reported=0.25, recomputed=0.25, cap=None, spent=0.25, remaining=None,
        num_records=300, noise_generators=["secure", "torch"],
        rounds=[1, 2, 3], epsilon_by_round=[0.1, 0.2, 0.25],
    )


FINDINGS = [
    Finding("info", "note", "run stopped early by the budget"),
    Finding("warning", "few_records", "only 40 records", site="hospital-b"),
    Finding("error", "reported_below_recomputed", "reported 1.200 < 1.235",
            site="hospital-a", seq=7),
]


def _report(sites: list[SiteAudit] | None = None, findings: list[Finding] | None = None,
            chain_problems: list[str] | None = None) -> AuditReport:
    return AuditReport(
        run_dir="runs/2024-05-01_demo", delta=1e-5, accountant="rdp",
        ledger_rows=21, ledger_head="ab12cd34", chain_ok=not chain_problems,
        chain_problems=chain_problems or [],
        sites=[_site_a(), _site_b(), _site_c()] if sites is None else sites,
        findings=[] if findings is None else findings,
        accuracy_by_round=[(1, 0.61, 0.7), (2, 0.72, 1.4), (3, 0.78, 2.1)],
        stop_reason="budget", config_hash="cfg99", versions={"opacus": "1.6.0", "flwr": "1.42.0"},
        created_at="2024-05-01T12:00:00Z",
    )


def _empty_report() -> AuditReport:
    report = _report(sites=[])
    report.accuracy_by_round = []
    return report


def _pixels(png: bytes) -> np.ndarray:
    assert png.startswith(PNG_SIGNATURE)
    return imread(io.BytesIO(png), format="png")


def _distinct_colours(pixels: np.ndarray) -> int:
    return len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0))


class _Tables(HTMLParser):
    """Body rows (cell texts) of every table with an id, plus every start tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._table: str | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self._table = dict(attrs).get("id")
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._table and self._in_body:
            self.rows.setdefault(self._table, []).append([])
        elif tag == "td" and self._table and self._in_body:
            self.rows[self._table][-1].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table, self._in_body = None, False
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data: str) -> None:
        if self._table and self._in_body and self.rows.get(self._table):
            row = self.rows[self._table][-1]
            if row:
                row[-1] += data


def _parse(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    return parser


# --------------------------------------------------------------------------- Markdown


def test_markdown_has_a_row_per_site_with_hand_formatted_numbers():
    # Prepare
    report = _report(findings=FINDINGS)

    # Execute
    md = render_markdown(report)

    # Assert
    assert ("| site | releases | records | sample rdp | sample prv | sample pld | client rdp | "
            "client prv | client pld | total rdp | total prv | total pld | reported | recomputed | "
            "spent | cap | remaining | noise |") in md
    assert ("| hospital-a | 12 | 1200 | 1.235 | 1.200 | n/a | 0.500 | 0.490 | 0.480 | 1.500 | "
            "1.450 | n/a | 1.200 | 1.235 | 1.235 | 8.000 | 6.765 | secure |") in md
    assert ("| hospital-b | 5 | n/a | ∞ | n/a | n/a | — | — | — | ∞ | n/a | n/a | n/a | ∞ | "
            "n/a | 3.000 | n/a | n/a |") in md
    assert ("| clinic-c | 3 | 300 | 0.250 | 0.240 | 0.240 | — | — | — | 0.250 | 0.240 | 0.240 | "
            "0.250 | 0.250 | 0.250 | n/a | n/a | secure, torch |") in md


def test_markdown_verdict_facts_findings_and_versions():
    # Prepare
    report = _report(findings=FINDINGS)

    # Execute
    md = render_markdown(report)

    # Assert
    assert "**Verdict: FAIL** (1 error finding(s))" in md
    for fact in ("runs/2024-05-01_demo", "**δ:** 1e-05", "**accountant:** rdp",
                 "**ledger rows:** 21", "ab12cd34", "**hash chain:** intact",
                 "**stop reason:** budget", "cfg99"):
        assert fact in md
    error, warning, info = (md.index(f"### {s} (1)") for s in ("error", "warning", "info"))
    assert error < warning < info
    assert ("- **reported_below_recomputed**: reported 1.200 &lt; 1.235 "
            "(site hospital-a, ledger row 7)") in md
    assert "- **few_records**: only 40 records (site hospital-b)" in md
    assert "| flwr | 1.42.0 |" in md and "| opacus | 1.6.0 |" in md


def test_markdown_passes_with_only_warnings():
    # Prepare
    report = _report(findings=FINDINGS[:2])

    # Execute
    md = render_markdown(report)

    # Assert
    assert "**Verdict: PASS**" in md
    assert "1 warning(s) to review" in md


def test_broken_chain_fails_and_lists_its_problems():
    # Prepare
    report = _report(chain_problems=["row 4: prev_hash does not match row 3", "row 9 missing"])

    # Execute
    md = render_markdown(report)
    page = render_html(report)

    # Assert
    assert not report.ok
    assert "**Verdict: FAIL** (ledger hash chain is broken (2 problem(s)))" in md
    assert "**hash chain:** BROKEN" in md
    assert "  - row 4: prev_hash does not match row 3" in md
    assert "  - row 9 missing" in md
    assert 'class="verdict fail"' in page
    items = [t for t, a in _parse(page).tags if t == "li"]
    assert len(items) == 2


def test_markdown_writes_and_links_plots_relative_to_its_folder(tmp_path: Path):
    # Prepare
    plots_dir = tmp_path / "audit" / "plots"
    md_path = tmp_path / "audit" / "report.md"

    # Execute
    md = render_markdown(_report(), plots_dir)
    md_path.write_text(md)

    # Assert
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", md)
    assert links == ["plots/epsilon_by_round.png", "plots/accuracy_vs_epsilon.png"]
    for link in links:
        target = md_path.parent / link
        assert target.is_file()
        assert target.read_bytes().startswith(PNG_SIGNATURE)


def test_markdown_without_plots_dir_has_no_images():
    md = render_markdown(_report())
    assert "![" not in md and "## Plots" not in md


def test_markdown_escapes_table_breaking_and_html_text():
    # Prepare
    report = _report(sites=[_site_c("a|b <i>x</i>")])

    # Execute
    md = render_markdown(report)

    # Assert
    assert "| a\\|b &lt;i&gt;x&lt;/i&gt; | 3 |" in md
    assert "<i>" not in md


# --------------------------------------------------------------------------- plots


def test_plots_are_valid_non_flat_pngs():
    # Prepare
    report = _report()

    # Execute
    pngs = [plot_epsilon_by_round(report), plot_accuracy_vs_epsilon(report)]

    # Assert
    for png in pngs:
        pixels = _pixels(png)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert _distinct_colours(pixels) > 20
        near_blue = np.all(np.abs(pixels[..., :3] - TAB_BLUE) < 0.02, axis=-1)
        assert near_blue.sum() > 50  # the first series was drawn


def test_epsilon_plot_has_a_line_per_site_and_dashed_caps():
    # Prepare
    report = _report()

    # Execute
    ax = _epsilon_figure(report).axes[0]

    # Assert
    solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_label() for line in solid] == ["hospital-a", "hospital-b", "clinic-c"]
    assert list(solid[1].get_ydata()) == [0.7, 1.4, 2.1]
    drawn = [line for line in dashed if len(line.get_ydata())]
    # The largest ε is 2.1 here: the cap 3 is drawn, the cap 8 (> 2 x 2.1) would flatten
    # the curves, so it is only named in the legend; clinic-c has no cap.
    assert [line.get_ydata()[0] for line in drawn] == [3.0]
    assert [line.get_label() for line in dashed if not len(line.get_ydata())] == [
        "hospital-a cap 8 (off scale)"]
    assert ax.get_xlabel() == "round"
    assert ax.get_ylabel() == "cumulative ε at δ=1e-05 (rdp)"
    assert ax.get_legend() is not None


def test_accuracy_plot_follows_the_largest_epsilon_and_labels_first_and_last_round():
    # Prepare
    report = _report()

    # Execute
    ax = _accuracy_figure(report).axes[0]

    # Assert
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0.7, 1.4, 2.1]
    assert list(line.get_ydata()) == [0.61, 0.72, 0.78]
    assert sorted(t.get_text() for t in ax.texts) == ["round 1", "round 3"]


def test_empty_report_renders_no_data_images_everywhere(tmp_path: Path):
    # Prepare
    report = _empty_report()

    # Execute
    pngs = [plot_epsilon_by_round(report), plot_accuracy_vs_epsilon(report)]
    md = render_markdown(report, tmp_path / "plots")
    page = render_html(report)

    # Assert
    for png in pngs:
        pixels = _pixels(png)
        assert 0 < pixels.shape[0] < 300 and 0 < pixels.shape[1] < 400
        assert _distinct_colours(pixels) > 2  # the "no data" text
    assert "No sites." in md and "No findings." in md
    assert (tmp_path / "plots" / "epsilon_by_round.png").is_file()
    assert "<p>No sites.</p>" in page
    assert "**Verdict: PASS**" in md


def test_epsilon_plot_refuses_rounds_and_values_of_different_length():
    # Prepare
    site = _site_a()
    site.epsilon_by_round = site.epsilon_by_round[:2]

    # Execute / Assert
    with pytest.raises(ValueError, match="hospital-a.*3 rounds but 2"):
        plot_epsilon_by_round(_report(sites=[site]))


# --------------------------------------------------------------------------- HTML / JSON


def test_html_is_self_contained():
    # Prepare
    page = render_html(_report(findings=FINDINGS))

    # Execute
    tags = _parse(page).tags

    # Assert
    assert "http://" not in page and "https://" not in page and "url(" not in page
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object")]
    sources = [a["src"] for t, a in tags if "src" in a]
    assert len(sources) == 2
    for src in sources:
        assert src is not None and src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    assert all(a.get("alt") for t, a in tags if t == "img")


def test_html_tables_have_a_row_per_site_and_finding():
    # Prepare
    report = _report(findings=FINDINGS)

    # Execute
    tables = _parse(render_html(report)).rows

    # Assert
    assert [row[0] for row in tables["sites"]] == ["hospital-a", "hospital-b", "clinic-c"]
    assert tables["sites"][1][:4] == ["hospital-b", "5", "n/a", "∞"]
    assert [row[:4] for row in tables["findings"]] == [
        ["error", "reported_below_recomputed", "hospital-a", "7"],
        ["warning", "few_records", "hospital-b", "n/a"],
        ["info", "note", "n/a", "n/a"],
    ]
    assert sorted(tables["versions"]) == [["flwr", "1.42.0"], ["opacus", "1.6.0"]]


def test_html_verdict_banner_colour_follows_the_verdict():
    assert 'class="verdict pass"' in render_html(_report())
    assert 'class="verdict fail"' in render_html(_report(findings=FINDINGS))


def test_html_escapes_site_names():
    # Prepare
    report = _report(sites=[_site_a(), _site_c("<script>x</script>")],
                     findings=[Finding("warning", "odd", "<b>bold</b>", site="<script>x</script>")])

    # Execute
    page = render_html(report)
    parsed = _parse(page)

    # Assert
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page
    assert [row[0] for row in parsed.rows["sites"]] == ["hospital-a", "<script>x</script>"]
    assert "script" not in [t for t, _ in parsed.tags]


def test_json_round_trips_with_ok_and_no_non_finite_numbers():
    # Prepare
    report = _report(findings=FINDINGS)

    # Execute
    data = json.loads(render_json(report))

    # Assert
    assert data["ok"] is False
    assert [s["site"] for s in data["sites"]] == ["hospital-a", "hospital-b", "clinic-c"]
    assert data["sites"][1]["recomputed"] is None  # inf
    assert data["sites"][0]["levels"]["sample"]["rdp"] == 1.23456
    assert data["findings"][2]["seq"] == 7
    assert json.loads(render_json(_empty_report()))["ok"] is True
