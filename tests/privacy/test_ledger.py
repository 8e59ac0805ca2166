"""The privacy ledger: round trips, durability settings, append-only triggers,
input validation, foreign files, concurrent writers and chain verification.

Files are edited behind the ledger's back with the standard ``sqlite3`` module,
the way an attacker (or a careless script) would.
"""

import hashlib
import json
import math
import multiprocessing
import random
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from privacy.ledger import SCHEMA_VERSION, ChainProblem, Charge, Ledger, LedgerError

GENESIS = "0" * 64

# Every content field of a row, as the test writes it (defaults spelled out).
BASE: dict[str, Any] = {
    "run_id": "run-1", "round": 1, "site": "site-a", "level": "sample",
    "noise_multiplier": 1.1, "clipping_norm": 1.0, "sample_rate": 0.01, "steps": 100,
    "delta": 1e-5, "sampling": "poisson", "relation": "add_remove", "mechanism": "gaussian",
    "noise_generator": "os-csprng", "num_records": 1000, "epsilon_cap": 8.0,
    "epsilon_reported": 0.5, "accountant": "rdp", "source": None,
}


def _charge(**overrides: Any) -> Charge:
    return Charge(**{**BASE, **overrides})


def _raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection that commits when used as a context manager."""
    return sqlite3.connect(str(path))


def _drop_triggers(path: Path) -> None:
    with closing(_raw(path)) as conn, conn:
        conn.execute("DROP TRIGGER releases_no_update")
        conn.execute("DROP TRIGGER releases_no_delete")


def _row_count(path: Path) -> int:
    with closing(_raw(path)) as conn:
        return conn.execute("SELECT COUNT(*) FROM releases").fetchone()[0]


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """A ledger holding five rows (rounds 1..5 of one site)."""
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path) as ledger:
        for rnd in range(1, 6):
            ledger.append(_charge(round=rnd, epsilon_reported=0.5 * rnd))
    return path


# --- round trip -------------------------------------------------------------------------------

def test_empty_ledger_head_is_genesis(tmp_path):
    # Prepare / Execute
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        head, rows = ledger.head(), ledger.rows()
    # Assert
    assert head == (0, GENESIS)
    assert rows == []


def test_rows_round_trip_what_was_appended(tmp_path):
    # Prepare
    charges = [_charge(site="site-a", round=1),
               _charge(site="site-b", round=1, num_records=None, epsilon_cap=None,
                       epsilon_reported=None, accountant=None, source="site-b#1:abc"),
               _charge(site="site-a", round=2, sampling="shuffle", relation="replace_one",
                       level="client", sample_rate=1.0)]
    # Execute
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        appended = [ledger.append(c) for c in charges]
        head, stored, site_a = ledger.head(), ledger.rows(), ledger.rows(site="site-a")
    with Ledger.open(tmp_path / "ledger.sqlite") as reopened:
        stored_again = reopened.rows()
    # Assert
    assert [r.seq for r in appended] == [1, 2, 3]
    assert [r.charge for r in appended] == charges
    assert stored == appended
    assert stored_again == appended
    assert site_a == [appended[0], appended[2]]
    assert head == (3, appended[-1].hash)
    assert [r.prev_hash for r in appended] == [GENESIS, appended[0].hash, appended[1].hash]


def test_rows_filter_on_several_fields_and_after_a_row(tmp_path):
    charges = [_charge(site="site-a", round=1), _charge(site="site-b", round=1),
               _charge(site="site-a", round=2, level="client", sample_rate=1.0),
               _charge(site="site-a", round=3), _charge(site="site-b", round=3,
                                                        epsilon_reported=None)]
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        stored = [ledger.append(c) for c in charges]
        a_sample = ledger.rows(site="site-a", level="sample")
        after_two = ledger.rows(after_seq=2)
        b_after_two = ledger.rows(after_seq=2, site="site-b")
        none_reported = ledger.rows(epsilon_reported=None)
        after_all = ledger.rows(after_seq=5)
    assert a_sample == [stored[0], stored[3]]
    assert after_two == stored[2:]
    assert b_after_two == [stored[4]]
    assert none_reported == [stored[4]]  # None matches a missing value, as == does
    assert after_all == []


def test_integer_reals_are_stored_as_floats(tmp_path):
    # Prepare: a real field given as an int must hash the same before and after storage.
    charge = _charge(clipping_norm=2, epsilon_cap=8)
    # Execute
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        ledger.append(charge)
        stored, problems = ledger.rows()[0].charge, ledger.verify()
    # Assert
    assert isinstance(stored.clipping_norm, float) and stored.clipping_norm == 2.0
    assert problems == []


def test_row_hash_is_sha256_of_previous_hash_and_canonical_json(tmp_path):
    # Prepare
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        first = ledger.append(_charge())
    # Execute: the documented format, worked out here by hand.
    body = json.dumps({"seq": 1, "created_at": first.created_at, **BASE}, sort_keys=True,
                      separators=(",", ":"))
    expected = hashlib.sha256(f"{GENESIS}\n{body}".encode()).hexdigest()
    # Assert
    assert first.hash == expected


# --- durability -------------------------------------------------------------------------------

def test_wal_journal_and_full_synchronous(tmp_path):
    # Prepare
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path) as ledger:
        ledger.append(_charge())
        # Execute: synchronous is per connection, so ask the ledger's own one;
        # the journal mode is stored in the file, so a separate connection sees it.
        synchronous = ledger._conn.execute("PRAGMA synchronous").fetchone()[0]
        with closing(_raw(path)) as other:
            journal = other.execute("PRAGMA journal_mode").fetchone()[0]
    # Assert
    assert synchronous == 2  # FULL (0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA)
    assert journal == "wal"


# --- append-only ------------------------------------------------------------------------------

@pytest.mark.parametrize("statement", [
    "UPDATE releases SET epsilon_reported = 0.0 WHERE seq = 3",
    "UPDATE releases SET noise_multiplier = noise_multiplier * 2",
    "DELETE FROM releases WHERE seq = 5",
    "DELETE FROM releases",
])
def test_update_and_delete_are_refused(ledger_path, statement):
    # Prepare
    with Ledger.open(ledger_path) as ledger:
        before = ledger.rows()
    # Execute / Assert
    with closing(_raw(ledger_path)) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(statement)
        conn.commit()
    with Ledger.open(ledger_path) as ledger:
        after, problems = ledger.rows(), ledger.verify()
    assert after == before
    assert problems == []


def test_replace_behind_the_triggers_is_caught_by_verify(ledger_path):
    # Prepare: INSERT OR REPLACE deletes the old row without firing the DELETE trigger
    # (SQLite fires it only with recursive_triggers on); with the trigger that refuses it
    # dropped too, the hash chain must still catch the edit.
    with closing(_raw(ledger_path)) as conn, conn:
        conn.execute("DROP TRIGGER releases_no_replace")
        columns = [r[1] for r in conn.execute("PRAGMA table_info(releases)")]
        row = list(conn.execute("SELECT * FROM releases WHERE seq = 2").fetchone())
        row[columns.index("noise_multiplier")] = 9.0
        # Execute
        conn.execute(f"INSERT OR REPLACE INTO releases VALUES ({', '.join('?' * len(row))})",
                     row)
    with Ledger.open(ledger_path) as ledger:
        problems = ledger.verify()
    # Assert
    assert {p.seq for p in problems} == {2}


def test_replace_is_refused_by_the_triggers(ledger_path):
    # Prepare
    with closing(_raw(ledger_path)) as conn:
        row = conn.execute("SELECT * FROM releases WHERE seq = 2").fetchone()
        # Execute / Assert
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(f"INSERT OR REPLACE INTO releases VALUES ({', '.join('?' * len(row))})",
                         row)


# --- bad input --------------------------------------------------------------------------------

REALS = ("noise_multiplier", "clipping_norm", "sample_rate", "delta", "epsilon_cap",
         "epsilon_reported")
BAD_VALUES = [
    ("epsilon_reported", -0.1),
    *[(name, bad) for name in REALS for bad in (math.nan, math.inf, -math.inf)],
    ("noise_multiplier", 0.0),
    ("noise_multiplier", -1.0),
    ("clipping_norm", 0.0),
    ("sample_rate", 0.0),
    ("sample_rate", 1.5),
    ("sample_rate", -0.1),
    ("delta", 0.0),
    ("delta", 1.0),
    ("steps", 0),
    ("steps", -3),
    ("steps", 10.0),
    ("steps", True),
    ("round", True),
    ("round", -1),
    ("num_records", False),
    ("num_records", 0),
    ("noise_multiplier", True),
    ("epsilon_cap", 0.0),
    ("level", "user"),
    ("sampling", "stratified"),
    ("relation", "swap_two"),
    ("mechanism", "laplace"),
    ("site", ""),
    ("run_id", ""),
    ("site", None),
    ("site", 7),
]


@pytest.mark.parametrize("field,value", BAD_VALUES,
                         ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_charge_is_refused_naming_the_field(ledger_path, field, value):
    # Prepare
    with Ledger.open(ledger_path) as ledger:
        head_before, count_before = ledger.head(), len(ledger.rows())
        # Execute / Assert
        with pytest.raises(LedgerError, match=rf"^{field}="):
            ledger.append(_charge(**{field: value}))
        assert ledger.head() == head_before
        assert len(ledger.rows()) == count_before
    assert _row_count(ledger_path) == 5


def test_append_refuses_anything_but_a_charge(ledger_path):
    # Prepare
    with Ledger.open(ledger_path) as ledger:
        head_before = ledger.head()
        # Execute / Assert
        with pytest.raises(LedgerError, match="expected a Charge, got dict"):
            ledger.append(dict(BASE))  # type: ignore[arg-type]
        assert ledger.head() == head_before


def test_rows_refuses_an_unknown_filter(ledger_path):
    with Ledger.open(ledger_path) as ledger:
        with pytest.raises(LedgerError, match="sigma"):
            ledger.rows(sigma=1.0)


# --- files that are not ledgers ---------------------------------------------------------------

def test_unknown_schema_version_is_refused_and_file_untouched(ledger_path):
    # Prepare
    assert SCHEMA_VERSION != 999
    with closing(_raw(ledger_path)) as conn, conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    before = ledger_path.read_bytes()
    # Execute / Assert
    with pytest.raises(LedgerError, match="999"):
        Ledger.open(ledger_path)
    assert ledger_path.read_bytes() == before
    assert _row_count(ledger_path) == 5


def test_missing_schema_version_is_refused(ledger_path):
    # Prepare
    with closing(_raw(ledger_path)) as conn, conn:
        conn.execute("DELETE FROM meta WHERE key = 'schema_version'")
    # Execute / Assert
    with pytest.raises(LedgerError, match="schema version None"):
        Ledger.open(ledger_path)
    assert _row_count(ledger_path) == 5


def _other_sqlite_file(path: Path) -> None:
    with closing(sqlite3.connect(str(path))) as conn, conn:
        conn.execute("CREATE TABLE patients (name TEXT)")
        conn.execute("INSERT INTO patients VALUES ('ada')")


def test_foreign_sqlite_file_is_refused_and_its_data_kept(tmp_path):
    # Prepare
    path = tmp_path / "other.sqlite"
    _other_sqlite_file(path)
    # Execute / Assert
    with pytest.raises(LedgerError, match="not a fedpriv ledger"):
        Ledger.open(path)
    with closing(_raw(path)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
        rows = conn.execute("SELECT name FROM patients").fetchall()
    assert tables == ["patients"]
    assert rows == [("ada",)]


def test_foreign_sqlite_file_bytes_are_untouched(tmp_path):
    # Prepare
    path = tmp_path / "other.sqlite"
    _other_sqlite_file(path)
    before = path.read_bytes()
    # Execute
    with pytest.raises(LedgerError):
        Ledger.open(path)
    # Assert
    assert path.read_bytes() == before


def test_random_bytes_file_is_refused_and_untouched(tmp_path):
    # Prepare
    path = tmp_path / "ledger.sqlite"
    junk = random.Random(0).randbytes(8192)
    path.write_bytes(junk)
    # Execute / Assert
    with pytest.raises(LedgerError, match="not a readable fedpriv ledger"):
        Ledger.open(path)
    assert path.read_bytes() == junk


def test_missing_file_without_create_is_refused_and_not_created(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with pytest.raises(LedgerError, match="no ledger there"):
        Ledger.open(path, create=False)
    assert not path.exists()


# --- concurrent writers -----------------------------------------------------------------------

WRITERS, ROWS_EACH = 3, 150


def _append_rows(path: str, site: str, count: int, start: object) -> None:
    """Child process: wait for the others, then open the ledger and append."""
    start.wait()  # type: ignore[attr-defined]
    with Ledger.open(path) as ledger:
        for i in range(count):
            ledger.append(_charge(site=site, round=i))


def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path, monkeypatch):
    # Prepare: spawned children import this module by name, so put the repo root
    # (where ``tests`` lives) on the path they inherit. They all open the (not yet
    # existing) ledger at once, so creating the schema races too.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    ctx = multiprocessing.get_context("spawn")
    path = tmp_path / "ledger.sqlite"
    start = ctx.Barrier(WRITERS)
    sites = [f"writer-{i}" for i in range(WRITERS)]
    procs = [ctx.Process(target=_append_rows, args=(str(path), site, ROWS_EACH, start))
             for site in sites]
    # Execute
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    # Assert
    assert [p.exitcode for p in procs] == [0] * WRITERS
    with Ledger.open(path) as ledger:
        rows, problems, head = ledger.rows(), ledger.verify(), ledger.head()
    assert [r.seq for r in rows] == list(range(1, WRITERS * ROWS_EACH + 1))
    for site in sites:
        assert sorted(r.charge.round for r in rows if r.charge.site == site) == \
            list(range(ROWS_EACH))
    assert len({r.hash for r in rows}) == len(rows)
    assert problems == []
    assert head == (WRITERS * ROWS_EACH, rows[-1].hash)


# --- verify -----------------------------------------------------------------------------------

def test_intact_ledger_verifies(ledger_path):
    with Ledger.open(ledger_path) as ledger:
        assert ledger.verify() == []


def test_verify_names_an_edited_row(ledger_path):
    # Prepare
    _drop_triggers(ledger_path)
    with closing(_raw(ledger_path)) as conn, conn:
        conn.execute("UPDATE releases SET epsilon_reported = 0.1 WHERE seq = 3")
    # Execute
    with Ledger.open(ledger_path) as ledger:
        problems = ledger.verify()
    # Assert: only row 3's content changed; row 4 still links to row 3's stored hash.
    assert problems == [ChainProblem(3, "content does not match its hash (the row was edited)")]


def test_verify_names_a_row_whose_hash_was_edited_and_its_successor(ledger_path):
    # Prepare
    _drop_triggers(ledger_path)
    with closing(_raw(ledger_path)) as conn, conn:
        conn.execute("UPDATE releases SET hash = hash || 'x' WHERE seq = 3")
    # Execute
    with Ledger.open(ledger_path) as ledger:
        problems = ledger.verify()
    # Assert
    assert {p.seq for p in problems} == {3, 4}


def test_verify_names_the_row_after_a_deleted_one(ledger_path):
    # Prepare
    _drop_triggers(ledger_path)
    with closing(_raw(ledger_path)) as conn, conn:
        conn.execute("DELETE FROM releases WHERE seq = 3")
    # Execute
    with Ledger.open(ledger_path) as ledger:
        problems = ledger.verify()
    # Assert: row 4 now follows row 2: a gap in seq and a prev_hash pointing at the lost
    # row. (Rows after it are reported as out of position too, since verify does not
    # resynchronise its expected seq; only the first one is required here.)
    named_4 = [p.problem for p in problems if p.seq == 4]
    assert any("expected 3" in text for text in named_4)
    assert any("prev_hash" in text for text in named_4)
    assert min(p.seq for p in problems) == 4


def test_verify_reports_content_that_is_no_valid_charge(ledger_path):
    # Prepare
    _drop_triggers(ledger_path)
    with closing(_raw(ledger_path)) as conn, conn:
        conn.execute("UPDATE releases SET noise_multiplier = -1.0 WHERE seq = 2")
    # Execute
    with Ledger.open(ledger_path) as ledger:
        problems = ledger.verify()
    # Assert
    assert {p.seq for p in problems} == {2}
    assert any("invalid content" in p.problem and "noise_multiplier" in p.problem
               for p in problems)
