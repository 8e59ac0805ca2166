"""The privacy ledger: an append-only, hash-chained SQLite record of every release.

One row per privacy release (a charge): who released what, with which noise,
sampling and clipping, under which neighbouring relation, drawn from which
noise generator. Rows are only ever inserted: triggers refuse ``UPDATE`` and
``DELETE``, and each row carries ``hash = sha256(prev_hash, seq, content)``, so
an edit made behind SQLite's back (or a dropped trigger) breaks the chain at
the edited row, and :meth:`Ledger.verify` names it.

Durability: WAL journal with ``synchronous = FULL``; :meth:`Ledger.append`
returns only after its transaction is committed to disk. Callers charge
*before* the noisy result leaves their process (write-ahead), so a crash can
over-count, never under-count. Concurrent writers (several processes) are
serialised by ``BEGIN IMMEDIATE``: no row is lost or duplicated and the chain
stays linear.

Who keeps a ledger: the server at ``RUN_DIR/ledger.sqlite`` (its own releases
and a mirror of what every site reported), and each site in its state folder
(``STATE_DIR/ledger.sqlite``; the authority on that site's spending, across
runs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from privacy.accounting import RELATIONS, SAMPLING_METHODS, GaussianRelease

__all__ = [
    "LEVELS",
    "SCHEMA_VERSION",
    "Charge",
    "ChainProblem",
    "Ledger",
    "LedgerError",
    "LedgerRow",
    "row_hash",
]

T = TypeVar("T")

SCHEMA_VERSION = 1
LEDGER_FILE = "ledger.sqlite"
LEVELS = ("sample", "client", "local", "statistics")
MECHANISMS = ("gaussian",)
GENESIS = "0" * 64


class LedgerError(ValueError):
    """A charge or a ledger file is invalid; nothing was written."""


@dataclass(frozen=True)
class Charge:
    """The content of one ledger row: ``steps`` releases of one Gaussian mechanism.

    ``noise_multiplier`` is the noise std divided by the sensitivity
    (``clipping_norm``). ``epsilon_reported`` is what the releasing party
    claimed, after this release, for its cumulative ε at ``delta`` (same run,
    site and level) with ``accountant``; the audit recomputes it.
    ``epsilon_cap`` is the site's cap in force when the charge was made.
    """

    run_id: str
    round: int
    site: str
    level: str
    noise_multiplier: float
    clipping_norm: float
    sample_rate: float
    steps: int
    delta: float
    sampling: str = "poisson"
    relation: str = "add_remove"
    mechanism: str = "gaussian"
    noise_generator: str = "unspecified"
    num_records: int | None = None
    epsilon_cap: float | None = None
    epsilon_reported: float | None = None
    accountant: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        _validate(self)

    def release(self) -> GaussianRelease:
        return GaussianRelease(self.noise_multiplier, self.sample_rate, self.steps,
                               self.sampling, self.relation)


_REALS = ("noise_multiplier", "clipping_norm", "sample_rate", "delta", "epsilon_cap",
          "epsilon_reported")
_INTS = ("round", "steps", "num_records")
_TEXTS = ("run_id", "site", "level", "sampling", "relation", "mechanism", "noise_generator",
          "accountant", "source")
_NULLABLE = ("num_records", "epsilon_cap", "epsilon_reported", "accountant", "source")
CONTENT_FIELDS = tuple(f.name for f in fields(Charge))


def _bad(name: str, value: Any, why: str) -> LedgerError:
    return LedgerError(f"{name}={value!r}: {why}")


def _validate(c: Charge) -> None:
    for name in CONTENT_FIELDS:
        value = getattr(c, name)
        if value is None:
            if name not in _NULLABLE:
                raise _bad(name, value, "required")
            continue
        if name in _REALS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _bad(name, value, "must be a number")
            if not math.isfinite(value):
                raise _bad(name, value, "must be finite")
            object.__setattr__(c, name, float(value))  # stored REAL, hashed as float
        elif name in _INTS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise _bad(name, value, "must be an integer")
        elif not isinstance(value, str) or not value:
            raise _bad(name, value, "must be a non-empty string")
    if c.noise_multiplier <= 0:
        raise _bad("noise_multiplier", c.noise_multiplier, "must be > 0 (a noiseless release "
                   "has no guarantee to record)")
    if c.clipping_norm <= 0:
        raise _bad("clipping_norm", c.clipping_norm, "must be > 0")
    if not 0 < c.sample_rate <= 1:
        raise _bad("sample_rate", c.sample_rate, "must be in (0, 1]")
    if c.steps < 1:
        raise _bad("steps", c.steps, "must be >= 1")
    if c.round < 0:
        raise _bad("round", c.round, "must be >= 0")
    if not 0 < c.delta < 1:
        raise _bad("delta", c.delta, "must be in (0, 1)")
    if c.level not in LEVELS:
        raise _bad("level", c.level, f"choose one of {list(LEVELS)}")
    if c.mechanism not in MECHANISMS:
        raise _bad("mechanism", c.mechanism, f"choose one of {list(MECHANISMS)}")
    if c.sampling not in SAMPLING_METHODS:
        raise _bad("sampling", c.sampling, f"choose one of {list(SAMPLING_METHODS)}")
    if c.relation not in RELATIONS:
        raise _bad("relation", c.relation, f"choose one of {list(RELATIONS)}")
    if c.num_records is not None and c.num_records < 1:
        raise _bad("num_records", c.num_records, "must be >= 1")
    if c.epsilon_cap is not None and c.epsilon_cap <= 0:
        raise _bad("epsilon_cap", c.epsilon_cap, "must be > 0")
    if c.epsilon_reported is not None and c.epsilon_reported < 0:
        raise _bad("epsilon_reported", c.epsilon_reported, "must be >= 0")


@dataclass(frozen=True)
class LedgerRow:
    seq: int
    created_at: float
    prev_hash: str
    hash: str
    charge: Charge


@dataclass(frozen=True)
class ChainProblem:
    """A row whose stored content does not match the chain (``seq`` names it)."""

    seq: int
    problem: str

    def __str__(self) -> str:
        return f"row {self.seq}: {self.problem}"


def row_hash(prev_hash: str, seq: int, created_at: float, content: dict[str, Any]) -> str:
    """sha256 over the previous hash and the row's canonical JSON."""
    body = json.dumps({"seq": seq, "created_at": created_at, **content}, sort_keys=True,
                      separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


_COLUMN_TYPES = {**{n: "REAL" for n in _REALS}, **{n: "INTEGER" for n in _INTS},
                 **{n: "TEXT" for n in _TEXTS}}
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
    seq INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    {", ".join(f"{n} {_COLUMN_TYPES[n]}{'' if n in _NULLABLE else ' NOT NULL'}"
               for n in CONTENT_FIELDS)},
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE
);
CREATE TRIGGER IF NOT EXISTS releases_no_update BEFORE UPDATE ON releases
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS releases_no_delete BEFORE DELETE ON releases
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS releases_no_replace BEFORE INSERT ON releases
WHEN EXISTS (SELECT 1 FROM releases WHERE seq = NEW.seq)
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"""
_COLUMNS = ("seq", "created_at", *CONTENT_FIELDS, "prev_hash", "hash")


class Ledger:
    """One ledger file. Open with :meth:`open` (creates it when absent)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = True) -> Ledger:
        """Open (and when ``create``, initialise) the ledger at ``path``.

        Raises :class:`LedgerError` for a file that is not a fedpriv ledger or
        has a schema version this code does not read.
        """
        path = Path(path)
        if path.is_dir():
            path = path / LEDGER_FILE
        if not create and not path.exists():
            raise LedgerError(f"{path}: no ledger there")
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=60.0, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 60000")
            # Look before touching: switching to WAL writes the file's header, and a
            # file that turns out not to be a ledger must be left as it was.
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables and not create:
                raise LedgerError(f"{path}: empty file, not a fedpriv ledger")
            if tables and ("meta" not in tables or "releases" not in tables):
                raise LedgerError(f"{path}: not a fedpriv ledger (tables {sorted(tables)})")
            if tables:
                row = conn.execute(
                    "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None or row[0] != str(SCHEMA_VERSION):
                    found = None if row is None else row[0]
                    raise LedgerError(f"{path}: ledger schema version {found!r}; this fedpriv "
                                      f"reads version {SCHEMA_VERSION} only")
            mode = _when_unlocked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if str(mode).lower() != "wal":
                raise LedgerError(f"{path}: could not switch to WAL journal (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            if not tables:
                with _immediate(conn):
                    for stmt in _SCHEMA.split(";\n"):
                        if stmt.strip():
                            conn.execute(stmt)
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                 (str(SCHEMA_VERSION),))
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('created_at', ?)",
                                 (repr(time.time()),))
        except sqlite3.DatabaseError as ex:
            conn.close()
            raise LedgerError(f"{path}: not a readable fedpriv ledger ({ex})") from ex
        except BaseException:
            conn.close()
            raise
        return cls(path, conn)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, charge: Charge) -> LedgerRow:
        """Commit one charge durably and return the stored row."""
        if not isinstance(charge, Charge):
            raise LedgerError(f"expected a Charge, got {type(charge).__name__}")
        content = asdict(charge)
        with _immediate(self._conn):
            last = self._conn.execute(
                "SELECT seq, hash FROM releases ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (1, GENESIS) if last is None else (last[0] + 1, last[1])
            created = time.time()
            digest = row_hash(prev, seq, created, content)
            self._conn.execute(
                f"INSERT INTO releases ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                (seq, created, *(content[n] for n in CONTENT_FIELDS), prev, digest),
            )
        return LedgerRow(seq, created, prev, digest, charge)

    def _raw(self, where: dict[str, Any] | None = None,
             after_seq: int = 0) -> list[dict[str, Any]]:
        # Column names come from CONTENT_FIELDS only (checked by the callers); values
        # are bound parameters, and ``IS`` matches None to NULL as Python's == does.
        where = where or {}
        conds = ["seq > ?", *(f"{k} IS ?" for k in where)]
        cur = self._conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM releases WHERE {' AND '.join(conds)} "
            "ORDER BY seq", (after_seq, *where.values()))
        return [dict(zip(_COLUMNS, r, strict=True)) for r in cur]

    def rows(self, *, after_seq: int = 0, **where: Any) -> list[LedgerRow]:
        """Stored rows in order, optionally filtered on content fields (``site="a"``)
        and to those after row ``after_seq``."""
        unknown = set(where) - set(CONTENT_FIELDS)
        if unknown:
            raise LedgerError(f"unknown ledger field(s) {sorted(unknown)}")
        out = []
        for r in self._raw(where, after_seq):
            charge = Charge(**{n: r[n] for n in CONTENT_FIELDS})
            out.append(LedgerRow(r["seq"], r["created_at"], r["prev_hash"], r["hash"], charge))
        return out

    def head(self) -> tuple[int, str]:
        """``(number of rows, hash of the last row)``; ``(0, GENESIS)`` when empty."""
        last = self._conn.execute(
            "SELECT seq, hash FROM releases ORDER BY seq DESC LIMIT 1").fetchone()
        return (0, GENESIS) if last is None else (int(last[0]), str(last[1]))

    def verify(self) -> list[ChainProblem]:
        """Every row whose content, position or link does not match the chain.

        Checks each row's hash against its stored content, that ``prev_hash``
        is the previous row's hash, that ``seq`` runs 1, 2, 3… without gaps,
        and that the content is a valid charge. An empty list means intact.
        """
        problems = []
        prev, expected_seq = GENESIS, 1
        for r in self._raw():
            seq = r["seq"]
            if seq != expected_seq:
                problems.append(ChainProblem(seq, f"sequence number {seq}, expected "
                                                  f"{expected_seq} (a row is missing or moved)"))
            if r["prev_hash"] != prev:
                problems.append(ChainProblem(seq, "prev_hash does not match the previous "
                                                  "row's hash"))
            content = {n: r[n] for n in CONTENT_FIELDS}
            created = r["created_at"]
            if row_hash(r["prev_hash"], seq, created, content) != r["hash"]:
                problems.append(ChainProblem(seq, "content does not match its hash (the row "
                                                  "was edited)"))
            try:
                Charge(**content)
            except (LedgerError, TypeError) as ex:
                problems.append(ChainProblem(seq, f"invalid content: {ex}"))
            # After a gap, count on from this row: one missing row is one problem.
            prev, expected_seq = r["hash"], seq + 1
        return problems


def _when_unlocked(fn: Callable[[], T], timeout: float = 60.0) -> T:
    """Run ``fn``, retrying while another process holds the database lock.

    SQLite's busy timeout does not cover every statement: switching the journal
    mode of a file another process is creating fails at once with "database is
    locked". Retry with a short, jittered back-off, for at most ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as ex:
            locked = "locked" in str(ex) or "busy" in str(ex)
            if not locked or time.monotonic() > deadline:
                raise
            time.sleep(0.02 + random.random() * 0.05)


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction taken up front (``BEGIN IMMEDIATE``); commit or roll back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
