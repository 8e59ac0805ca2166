"""The audit report shows the canary audit: ε_lb beside the accountants' ε, the GDP
estimate labelled as an estimate, the ceiling, and the verdict (reports built by hand)."""

import json
from html.parser import HTMLParser

from privacy.report import AuditReport, EmpiricalSummary, Finding, SiteAudit
from server.report import render_html, render_json, render_markdown


def _report(epsilon_lb: float) -> AuditReport:
    site = SiteAudit(site="client-0", releases=3, levels={"sample": {"rdp": 2.1, "prv": 1.95,
                                                                     "pld": 1.94}},
                     total={"rdp": 2.1, "prv": 1.95, "pld": 1.94}, accountant="prv",
                     reported=1.95, recomputed=1.95, cap=None, spent=1.95, remaining=None,
                     num_records=700, noise_generators=["torch"])
    empirical = EmpiricalSummary(
        level="sample", m=500, members=249, guesses=300, correct=171, epsilon_lb=epsilon_lb,
        ceiling=4.5993, gdp_epsilon_estimate=0.7568, significance=0.05, delta=1e-5,
        claimed_epsilon=1.95, claimed_site="client-0",
        claimed_by_accountant={"rdp": 2.1, "prv": 1.95, "pld": 1.94},
        recorded_epsilon_lb=epsilon_lb)
    return AuditReport(
        run_dir="runs/canaries", delta=1e-5, accountant="prv", ledger_rows=3,
        ledger_head="ab12", chain_ok=True, chain_problems=[], sites=[site],
        findings=[Finding("info", "empirical_ceiling", "with m = 500 canaries ...")],
        accuracy_by_round=[], stop_reason="completed", config_hash=None, versions={},
        created_at="2026-01-01T00:00:00Z", empirical=empirical)


def _section(markdown: str) -> str:
    return markdown.split("## Empirical audit (canaries)")[1].split("## ")[0]


def test_markdown_shows_the_bound_beside_the_claims():
    # Execute
    section = _section(render_markdown(_report(0.4241)))

    # Assert: one row per figure, values to three decimals.
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1].strip(" |")
            for line in section.splitlines() if line.startswith("| ") and " | " in line}
    assert rows["empirical lower bound ε_lb (sample-level canaries; holds with probability "
                "95%)"] == "0.424"
    assert rows["claimed ε (prv; the largest of the sites with canaries: client-0)"] == "1.950"
    assert (rows["claimed ε, rdp"], rows["claimed ε, pld"]) == ("2.100", "1.940")
    assert rows["ceiling: the largest ε_lb this run could show (m = 500)"] == "4.599"
    assert rows["Gaussian-DP estimate (an estimate, not a bound)"] == "0.757"
    assert rows["guesses"] == "171 right of 300 (500 canaries, 249 in)"
    assert "did not refute the claim" in section


def test_markdown_says_plainly_when_the_bound_exceeds_the_claim():
    section = _section(render_markdown(_report(3.9)))
    assert "evidence of a privacy bug (noise too small" in section


def test_json_carries_the_figures():
    doc = json.loads(render_json(_report(0.4241)))["empirical"]
    assert doc["epsilon_lb"] == 0.4241 and doc["claimed_epsilon"] == 1.95
    assert doc["ceiling"] == 4.5993 and doc["gdp_epsilon_estimate"] == 0.7568
    assert doc["claimed_by_accountant"] == {"rdp": 2.1, "prv": 1.95, "pld": 1.94}


def test_html_has_the_table_and_the_verdict():
    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.inside, self.cells = False, []

        def handle_starttag(self, tag, attrs):
            self.inside = self.inside or ("id", "empirical") in attrs

        def handle_endtag(self, tag):
            self.inside = self.inside and tag != "table"

        def handle_data(self, data):
            if self.inside and data.strip():
                self.cells.append(data.strip())

    parser = Cells()
    page = render_html(_report(0.4241))
    parser.feed(page)
    assert "Gaussian-DP estimate (an estimate, not a bound)" in parser.cells
    assert parser.cells[parser.cells.index("guesses") + 1] == \
        "171 right of 300 (500 canaries, 249 in)"
    assert 'id="empirical-verdict"' in page
