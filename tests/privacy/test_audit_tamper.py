"""The tamper test: a run directory built by hand, then edited one value at a time
behind the ledger's back; the audit must notice every edit and name the row.

The run: a server ledger with 2 sites x 3 rounds of sample-level DP-SGD releases
(σ 1.0, q 0.1, 10 steps, δ 1e-5), each row reporting the honest cumulative RDP ε,
and a summary.json that records the ledger's head.

Cost: ``audit_run`` recomputes ε with RDP, PRV and PLD (2-7 s per audit on this
2-core machine), so auditing all 6 rows x 22 columns would take many minutes.
The exhaustive row x column sweep is therefore made with ``Ledger.verify()``, the
very chain check ``audit_run`` runs and turns into one error finding per problem
(milliseconds per edit). ``audit_run`` itself is run on a subset that covers each
kind of edit once: a link (row 1's prev_hash to genesis), the last row's hash, a
moved seq, a NULL column given a value, a text edit that keeps the row valid (site)
and ones that make it invalid (level, sampling, relation, mechanism), a number the
accounting uses (steps) and, in the CLI test, the reported ε. Edits that change σ
or q are left to the sweep: they give a history of two different releases, which
costs PLD several seconds more per audit without exercising any other audit path.
"""

import dataclasses
import json
import math
import re
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from privacy.audit import audit_run
from privacy.ledger import Charge, Ledger, row_hash
from server.audit import main as audit_main

DELTA = 1e-5
SIGMA, RATE, STEPS = 1.0, 0.1, 10
SITES = ("site-a", "site-b")
ROUNDS = (1, 2, 3)
N_ROWS = len(SITES) * len(ROUNDS)
MIDDLE = 3  # site-a, round 2

COLUMNS = ("seq", "created_at", *(f.name for f in dataclasses.fields(Charge)),
           "prev_hash", "hash")
# A value for each column the run leaves NULL on some rows (site-b has no cap and
# no record count; no row cites a site ledger).
NULL_FILL = {"num_records": 1000, "epsilon_cap": 50.0, "epsilon_reported": 1.0,
             "accountant": "rdp", "source": "site-a#1:" + "0" * 64}


def _honest_epsilons() -> list[float]:
    """Cumulative ε after each round, from Opacus' RDP accountant used directly."""
    acc, out = RDPAccountant(), []
    for _ in ROUNDS:
        for _ in range(STEPS):
            acc.step(noise_multiplier=SIGMA, sample_rate=RATE)
        out.append(acc.get_epsilon(delta=DELTA))
    return out


@pytest.fixture(scope="module")
def honest() -> list[float]:
    return _honest_epsilons()


def _charge(site: str, rnd: int, eps: float) -> Charge:
    capped = site == "site-a"
    return Charge(
        run_id="run-1", round=rnd, site=site, level="sample", noise_multiplier=SIGMA,
        clipping_norm=1.0, sample_rate=RATE, steps=STEPS, delta=DELTA,
        noise_generator="os-csprng", num_records=1000 if capped else None,
        epsilon_cap=50.0 if capped else None, epsilon_reported=eps, accountant="rdp")


def _build_run(run_dir: Path, honest: list[float], lie: tuple[str, int] | None = None
               ) -> None:
    """Write ledger.sqlite and summary.json; ``lie``: (site, round) that under-reports."""
    run_dir.mkdir(parents=True)
    with Ledger.open(run_dir / "ledger.sqlite") as ledger:
        for rnd in ROUNDS:
            for site in SITES:
                eps = honest[rnd - 1] * (0.9 if (site, rnd) == lie else 1.0)
                ledger.append(_charge(site, rnd, eps))
        rows, head = ledger.head()
    summary = {"delta": DELTA, "accountant": "opacus-rdp",
               "ledger": {"rows": rows, "head": head}}
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, honest) -> Path:
    run_dir = tmp_path_factory.mktemp("pristine") / "run"
    _build_run(run_dir, honest)
    return run_dir


@pytest.fixture
def run_copy(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "run"))


def _connect(run_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(run_dir / "ledger.sqlite"))


def _tampered(column: str, value: object) -> object:
    """The edited value: numbers x1.5 (integers +1), text + 'x', NULL gets a value."""
    if column == "seq":
        # seq is the primary key: +1 would collide with the next row, so move the
        # row past the end of the chain instead.
        return int(value) + N_ROWS  # type: ignore[call-overload]
    if value is None:
        return NULL_FILL[column]
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, int):
        return value + 1
    assert isinstance(value, float)
    return value * 1.5


def _tamper(run_dir: Path, seq: int, column: str) -> int:
    """Drop the triggers and edit one stored value; return the row's seq afterwards."""
    with closing(_connect(run_dir)) as conn, conn:
        conn.execute("DROP TRIGGER releases_no_update")
        conn.execute("DROP TRIGGER releases_no_delete")
        (old,) = conn.execute(f"SELECT {column} FROM releases WHERE seq = ?",
                              (seq,)).fetchone()
        new = _tampered(column, old)
        assert new != old
        conn.execute(f"UPDATE releases SET {column} = ? WHERE seq = ?", (new, seq))
    return int(new) if column == "seq" else seq  # type: ignore[call-overload]


def _named_rows(report) -> set[int]:
    """Rows named by an error finding or a chain problem."""
    named = {f.seq for f in report.findings if f.severity == "error" and f.seq is not None}
    for problem in report.chain_problems:
        match = re.match(r"row (\d+):", problem)
        assert match, problem
        named.add(int(match.group(1)))
    return named


def _errors(report) -> list:
    return [f for f in report.findings if f.severity == "error"]


# --- the honest run ---------------------------------------------------------------------------

def test_stored_columns_are_the_ones_tampered(pristine):
    # Prepare / Execute
    with closing(_connect(pristine)) as conn:
        stored = [r[1] for r in conn.execute("PRAGMA table_info(releases)")]
    # Assert: a new column would need a tamper case of its own.
    assert sorted(stored) == sorted(COLUMNS)
    assert len(COLUMNS) == 22


def test_honest_run_audits_clean(pristine, honest, capsys):
    # Prepare
    expected = {site: honest[-1] for site in SITES}
    # Execute
    report = audit_run(pristine)
    code = audit_main([str(pristine), "--format", "json"])
    printed = json.loads(capsys.readouterr().out)
    # Assert
    assert report.ok, _errors(report)
    assert report.chain_problems == []
    assert report.ledger_rows == N_ROWS
    assert {s.site: s.recomputed for s in report.sites} == pytest.approx(expected, rel=1e-9)
    assert [s.rounds for s in report.sites] == [list(ROUNDS)] * len(SITES)
    assert code == 0
    assert printed["ok"] is True


# --- every single edit ------------------------------------------------------------------------

@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("seq", range(1, N_ROWS + 1))
def test_every_edit_breaks_the_chain_at_that_row(run_copy, seq, column):
    # Prepare
    new_seq = _tamper(run_copy, seq, column)
    # Execute
    with Ledger.open(run_copy / "ledger.sqlite", create=False) as ledger:
        problems = ledger.verify()
    # Assert: an edited seq may be named at its new position (its hash covers seq);
    # no edit is ever blamed on an earlier row.
    assert {p.seq for p in problems} & {seq, new_seq}, problems
    assert min(p.seq for p in problems) >= seq


AUDITED = [
    (1, "prev_hash"), (6, "hash"), (MIDDLE, "seq"), (2, "epsilon_cap"), (4, "site"),
    (MIDDLE, "steps"), (MIDDLE, "level"), (4, "sampling"), (5, "relation"), (6, "mechanism"),
]


@pytest.mark.parametrize("seq,column", AUDITED, ids=[f"row{s}-{c}" for s, c in AUDITED])
def test_audit_names_the_edited_row(run_copy, seq, column):
    # Prepare
    new_seq = _tamper(run_copy, seq, column)
    # Execute
    report = audit_run(run_copy)
    # Assert: for a seq edit either the old or the new seq is accepted (in practice the
    # moved row fails its hash at the new one; the row after the gap is named too).
    assert not report.ok
    assert not report.chain_ok
    assert _named_rows(report) & {seq, new_seq}, (report.chain_problems, _errors(report))


def test_cli_exits_1_on_a_tampered_run(run_copy, capsys):
    # Prepare: the edit a liar wants: a smaller reported ε on a middle row.
    with closing(_connect(run_copy)) as conn, conn:
        conn.execute("DROP TRIGGER releases_no_update")
        conn.execute("UPDATE releases SET epsilon_reported = epsilon_reported / 2 "
                     "WHERE seq = 4")
    # Execute
    code = audit_main([str(run_copy), "--format", "json"])
    printed = json.loads(capsys.readouterr().out)
    # Assert
    assert code == 1
    assert printed["ok"] is False
    assert any(p.startswith("row 4:") for p in printed["chain_problems"])


# --- edits the chain alone cannot see ---------------------------------------------------------

def test_truncated_last_row_is_caught_by_the_summary_head(run_copy):
    # Prepare
    with closing(_connect(run_copy)) as conn, conn:
        conn.execute("DROP TRIGGER releases_no_delete")
        conn.execute("DELETE FROM releases WHERE seq = ?", (N_ROWS,))
    with Ledger.open(run_copy / "ledger.sqlite", create=False) as ledger:
        chain = ledger.verify()
    # Execute
    report = audit_run(run_copy)
    # Assert: the shorter chain is intact in itself; only summary.json's head shows it.
    assert chain == []
    assert not report.ok
    assert [f.code for f in _errors(report)] == ["ledger_head_mismatch"]


def _rechain_last_row(run_dir: Path, column: str, value: object) -> None:
    """Edit the last row and recompute its hash, as anyone with the file can."""
    with closing(_connect(run_dir)) as conn, conn:
        conn.row_factory = sqlite3.Row
        conn.execute("DROP TRIGGER releases_no_update")
        row = dict(conn.execute("SELECT * FROM releases WHERE seq = ?", (N_ROWS,)).fetchone())
        row[column] = value
        content = {f.name: row[f.name] for f in dataclasses.fields(Charge)}
        digest = row_hash(row["prev_hash"], N_ROWS, row["created_at"], content)
        conn.execute(f"UPDATE releases SET {column} = ?, hash = ? WHERE seq = ?",
                     (value, digest, N_ROWS))


@pytest.fixture(scope="module")
def rechained(pristine, tmp_path_factory):
    """The run with its last row claiming half the steps it took, re-hashed: the
    chain is intact, only summary.json's head differs. Audited once (module scope)."""
    run_dir = Path(shutil.copytree(pristine, tmp_path_factory.mktemp("rechained") / "run"))
    _rechain_last_row(run_dir, "steps", STEPS // 2)
    with Ledger.open(run_dir / "ledger.sqlite", create=False) as ledger:
        chain = ledger.verify()
    return chain, audit_run(run_dir)


def test_rehashed_last_row_is_flagged_by_the_summary_head(rechained):
    # Prepare / Execute (in the fixture)
    chain, report = rechained
    # Assert
    assert chain == []
    assert "ledger_head_mismatch" in {f.code for f in report.findings}


def test_rehashed_last_row_fails_the_audit(rechained):
    # Prepare / Execute (in the fixture)
    _, report = rechained
    # Assert
    assert not report.ok


# --- a run that lies without tampering --------------------------------------------------------

def test_under_reported_epsilon_is_named(tmp_path, honest):
    # Prepare: site-b's round-2 row (seq 4) claims 90% of its honest ε.
    run_dir = tmp_path / "run"
    _build_run(run_dir, honest, lie=("site-b", 2))
    # Execute
    report = audit_run(run_dir)
    # Assert
    below = [f for f in report.findings if f.code == "reported_below_recomputed"]
    assert report.chain_ok
    assert not report.ok
    assert [(f.severity, f.site, f.seq) for f in below] == [("error", "site-b", 4)]
    assert math.isclose(honest[1] * 0.9, float(re.search(r"epsilon=([\d.]+)",
                                                         below[0].message).group(1)),
                        abs_tol=1e-4)
