"""The campaign journal: one SQLite file (WAL) that makes every candidate durable.

It holds the campaign config, the provenance of its models, every candidate (genome, recipe,
status, metrics, objectives, held-out scores, timings, error and its kind, racing's incumbent,
generation) and one optimizer checkpoint per generation. A result is committed before the
optimizer is told about it, so a kill at any moment loses at most the evaluations that were
still running. Journals written by older versions gain the new columns on open.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import EvomergeError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    genome TEXT NOT NULL,
    recipe TEXT NOT NULL,
    status TEXT NOT NULL,              -- pending | done | raced (stopped early) | failed
    metrics TEXT,                      -- {metric: value}
    metric_identity TEXT,              -- [{task, split, n, ...}] what produced the metrics
    objectives TEXT,                   -- {objective: value}
    holdout TEXT,                      -- {metric or objective: value}, for front members
    error TEXT,
    error_kind TEXT,                   -- candidate (told as a penalty) | infrastructure (never told)
    last_error TEXT,                   -- the latest infrastructure error while the candidate was pending
    incumbent REAL,                    -- racing: the best full objective before this generation
    asked_after INTEGER,               -- no barrier: results told to the optimizer before this one was asked
    told INTEGER,                      -- no barrier: its place in the order results were told (0, 1, ...)
    attempts INTEGER NOT NULL DEFAULT 0,
    examples INTEGER,                  -- examples scored for the fitness metrics
    materialize_s REAL,
    eval_s REAL,
    created REAL NOT NULL,
    finished REAL,
    UNIQUE (generation, slot)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    generation INTEGER PRIMARY KEY,
    evaluated INTEGER NOT NULL,
    state TEXT NOT NULL,
    digest TEXT NOT NULL,
    hypervolume REAL,
    created REAL NOT NULL
);
"""


# Columns added after the first release: (name, type) added to older journals on open.
ADDED_COLUMNS = (("error_kind", "TEXT"), ("last_error", "TEXT"), ("incumbent", "REAL"), ("asked_after", "INTEGER"),
                 ("told", "INTEGER"))


@dataclass
class CandidateRow:
    id: int
    generation: int
    slot: int
    genome: list[float]
    recipe: dict
    status: str
    metrics: dict | None
    objectives: dict | None
    holdout: dict | None
    error: str | None
    attempts: int
    materialize_s: float | None
    eval_s: float | None
    finished: float | None
    examples: int | None
    error_kind: str | None = None
    last_error: str | None = None
    incumbent: float | None = None
    identity: list | None = None
    asked_after: int | None = None
    told: int | None = None


class _BadValue(Exception):
    pass


def _loads(text):
    try:
        return json.loads(text) if text is not None else None
    except (json.JSONDecodeError, TypeError) as exc:
        raise _BadValue(f"a stored value is not JSON: {str(text)[:40]!r}") from exc


def _dumps(values: dict | None) -> str | None:
    """Strict JSON: a non-finite number (never a valid score) is stored as null, not as NaN."""
    if values is None:
        return None
    return json.dumps({k: (v if not isinstance(v, float) or v == v and abs(v) != float("inf") else None)
                       for k, v in values.items()}, allow_nan=False)


def _check_length(db: sqlite3.Connection, path: Path) -> None:
    """A truncated SQLite file can still open and read as nearly empty; its page count says how long it must be.

    Only stat() is used: opening and closing the file here would drop SQLite's POSIX locks held by
    another connection in this process.
    """
    wal = path.with_name(path.name + "-wal")
    if not path.exists() or wal.exists() and wal.stat().st_size > 0:
        return  # pages may live in the write-ahead log
    size = db.execute("PRAGMA page_size").fetchone()[0] * db.execute("PRAGMA page_count").fetchone()[0]
    if path.stat().st_size < size:
        raise sqlite3.DatabaseError(f"the file has {path.stat().st_size} bytes, its pages need {size}: truncated")


def damaged(path: Path, exc: BaseException) -> EvomergeError:
    return EvomergeError(f"{path} is damaged or not an evomerge journal ({str(exc).splitlines()[0]}); "
                         "restore it from a backup, or start the campaign again in a new --out folder")


class Journal:
    FILE = "journal.sqlite"

    def __init__(self, folder: str | Path, create: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / self.FILE
        if self.folder.exists() and not self.folder.is_dir():
            raise EvomergeError(f"{self.folder} is a file, not a campaign folder; pass the folder given to --out")
        if not create and not self.path.is_file():
            raise EvomergeError(f"{self.folder} holds no campaign journal ({self.FILE}); "
                                f"start one with `evomerge run CONFIG --out {self.folder}`")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EvomergeError(f"cannot create campaign folder {self.folder} ({exc.strerror}); "
                                "pick an --out folder you can write to") from None
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            _check_length(self.db, self.path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed result survives power loss too
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if create:
                self.db.executescript(SCHEMA)
            elif not {"meta", "candidates", "checkpoints"} <= tables:  # reading must not invent an empty campaign
                raise sqlite3.DatabaseError(f"tables missing: {sorted({'meta', 'candidates', 'checkpoints'} - tables)}")
            have = {r[1] for r in self.db.execute("PRAGMA table_info(candidates)")}
            for column, kind in ADDED_COLUMNS:
                if column not in have:
                    self.db.execute(f"ALTER TABLE candidates ADD COLUMN {column} {kind}")
            if self.db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
        except sqlite3.OperationalError as exc:
            if "unable to open" in str(exc) or "readonly" in str(exc) or "disk" in str(exc):
                raise EvomergeError(f"cannot open {self.path} ({exc}); check that the folder is writable "
                                    "and the disk is not full") from None
            raise damaged(self.path, exc) from None
        except sqlite3.DatabaseError as exc:
            raise damaged(self.path, exc) from None

    @classmethod
    def exists(cls, folder: str | Path) -> bool:
        return (Path(folder) / cls.FILE).is_file()

    def close(self) -> None:
        self.db.close()

    # -- meta ---------------------------------------------------------------------------------

    def get(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        try:
            return _loads(row[0]) if row else default
        except _BadValue as exc:
            raise damaged(self.path, exc) from None

    @contextmanager
    def transaction(self):
        """Several writes that land together or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def reset(self) -> None:
        """Forget a campaign that has no finished candidate, so a corrected config can start in its folder."""
        with self.transaction():
            self.db.execute("DELETE FROM candidates")
            self.db.execute("DELETE FROM checkpoints")
            self.db.execute("DELETE FROM meta")

    def set(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # -- candidates ---------------------------------------------------------------------------

    def _row(self, r) -> CandidateRow:
        try:
            row = CandidateRow(r[0], r[1], r[2], _loads(r[3]), _loads(r[4]), r[5], _loads(r[6]), _loads(r[7]),
                               _loads(r[8]), r[9], r[10], r[11], r[12], r[13], r[14], r[15], r[16], r[17],
                               _loads(r[18]), r[19], r[20])
        except _BadValue as exc:
            raise damaged(self.path, exc) from None
        finished = row.status in ("done", "raced")
        if not isinstance(row.genome, list) or not isinstance(row.recipe, dict) or \
                (finished and not isinstance(row.objectives, dict)):
            raise damaged(self.path, ValueError(f"candidate #{row.id} is incomplete"))
        return row

    _COLUMNS = ("id, generation, slot, genome, recipe, status, metrics, objectives, holdout, error, attempts, "
                "materialize_s, eval_s, finished, examples, error_kind, last_error, incumbent, metric_identity, "
                "asked_after, told")

    def candidate(self, cid: int) -> CandidateRow | None:
        r = self.db.execute(f"SELECT {self._COLUMNS} FROM candidates WHERE id = ?", (cid,)).fetchone()
        return self._row(r) if r else None

    def generation(self, generation: int) -> dict[int, CandidateRow]:
        rows = self.db.execute(f"SELECT {self._COLUMNS} FROM candidates WHERE generation = ?", (generation,))
        return {r[2]: self._row(r) for r in rows}

    def candidates(self, status: str | None = None) -> list[CandidateRow]:
        q = f"SELECT {self._COLUMNS} FROM candidates"
        args: tuple = ()
        if status:
            q += " WHERE status = ?"
            args = (status,)
        return [self._row(r) for r in self.db.execute(q + " ORDER BY id", args)]

    def add_pending(self, generation: int, slot: int, genome: list[float], recipe: dict,
                    incumbent: float | None = None, asked_after: int | None = None) -> int:
        cur = self.db.execute(
            "INSERT INTO candidates (generation, slot, genome, recipe, status, incumbent, asked_after, created) "
            "VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
            (generation, slot, json.dumps(genome), json.dumps(recipe), incumbent, asked_after, time.time()),
        )
        return int(cur.lastrowid)

    def record_infrastructure_error(self, cid: int, error: str) -> None:
        """The candidate stays pending (it was not at fault); the error is kept for `status` and `inspect`."""
        self.db.execute("UPDATE candidates SET last_error = ? WHERE id = ?", (error, cid))

    def mark_started(self, cid: int) -> None:
        self.db.execute("UPDATE candidates SET attempts = attempts + 1 WHERE id = ?", (cid,))

    def record_result(self, cid: int, metrics: dict | None, identity: list | None, objectives: dict | None,
                      error: str | None, materialize_s: float | None, eval_s: float | None,
                      examples: int | None = None, raced: bool = False, told: int | None = None) -> None:
        """A finished candidate: done, raced (stopped early) or failed on its own (`error`). `told`: its
        place in the order results are told (without a barrier), committed with the result itself."""
        status = "failed" if error else ("raced" if raced else "done")
        self.db.execute(
            "UPDATE candidates SET status = ?, metrics = ?, metric_identity = ?, objectives = ?, error = ?, "
            "error_kind = ?, materialize_s = ?, eval_s = ?, examples = ?, told = ?, finished = ? WHERE id = ?",
            (status, _dumps(metrics), json.dumps(identity) if identity else None, _dumps(objectives), error,
             "candidate" if error else None, materialize_s, eval_s, examples, told, time.time(), cid),
        )

    def examples_scored(self) -> int:
        return int(self.db.execute("SELECT COALESCE(SUM(examples), 0) FROM candidates").fetchone()[0])

    def record_holdout(self, cid: int, holdout: dict) -> None:
        self.db.execute("UPDATE candidates SET holdout = ? WHERE id = ?", (_dumps(holdout), cid))

    def count(self, *statuses: str) -> int:
        marks = ",".join("?" * len(statuses))
        return int(self.db.execute(f"SELECT COUNT(*) FROM candidates WHERE status IN ({marks})", statuses).fetchone()[0])

    # -- optimizer checkpoints ----------------------------------------------------------------

    def checkpoint(self, generation: int) -> dict | None:
        r = self.db.execute("SELECT state, digest, evaluated, hypervolume FROM checkpoints WHERE generation = ?",
                            (generation,)).fetchone()
        if not r:
            return None
        return {"state": json.loads(r[0]), "digest": r[1], "evaluated": r[2], "hypervolume": r[3]}

    def checkpoints(self) -> list[dict]:
        rows = self.db.execute("SELECT generation, evaluated, digest, hypervolume FROM checkpoints ORDER BY generation")
        return [{"generation": g, "evaluated": e, "digest": d, "hypervolume": h} for g, e, d, h in rows]

    def add_checkpoint(self, generation: int, evaluated: int, checkpoint: dict, hypervolume: float | None) -> None:
        self.db.execute(
            "INSERT INTO checkpoints (generation, evaluated, state, digest, hypervolume, created) VALUES (?, ?, ?, ?, ?, ?)",
            (generation, evaluated, json.dumps(checkpoint["state"]), checkpoint["digest"], hypervolume, time.time()),
        )
