"""The campaign journal: one SQLite file (WAL) that makes every candidate durable.

It holds the campaign config, every candidate (genome, recipe, status, metrics, objectives,
held-out scores, timings, error, generation) and one optimizer checkpoint per generation. A
result is committed before the optimizer is told about it, so a kill at any moment loses at most
the evaluations that were still running.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

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


def _loads(text):
    return json.loads(text) if text is not None else None


class Journal:
    FILE = "journal.sqlite"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / self.FILE
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed result survives power loss too
        self.db.executescript(SCHEMA)

    @classmethod
    def exists(cls, folder: str | Path) -> bool:
        return (Path(folder) / cls.FILE).is_file()

    def close(self) -> None:
        self.db.close()

    # -- meta ---------------------------------------------------------------------------------

    def get(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # -- candidates ---------------------------------------------------------------------------

    def _row(self, r) -> CandidateRow:
        return CandidateRow(r[0], r[1], r[2], json.loads(r[3]), json.loads(r[4]), r[5], _loads(r[6]), _loads(r[7]),
                            _loads(r[8]), r[9], r[10], r[11], r[12], r[13], r[14])

    _COLUMNS = ("id, generation, slot, genome, recipe, status, metrics, objectives, holdout, error, attempts, "
                "materialize_s, eval_s, finished, examples")

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

    def add_pending(self, generation: int, slot: int, genome: list[float], recipe: dict) -> int:
        cur = self.db.execute(
            "INSERT INTO candidates (generation, slot, genome, recipe, status, created) VALUES (?, ?, ?, ?, 'pending', ?)",
            (generation, slot, json.dumps(genome), json.dumps(recipe), time.time()),
        )
        return int(cur.lastrowid)

    def mark_started(self, cid: int) -> None:
        self.db.execute("UPDATE candidates SET attempts = attempts + 1 WHERE id = ?", (cid,))

    def record_result(self, cid: int, metrics: dict | None, identity: list | None, objectives: dict | None,
                      error: str | None, materialize_s: float | None, eval_s: float | None,
                      examples: int | None = None, raced: bool = False) -> None:
        status = "failed" if error else ("raced" if raced else "done")
        self.db.execute(
            "UPDATE candidates SET status = ?, metrics = ?, metric_identity = ?, objectives = ?, error = ?, "
            "materialize_s = ?, eval_s = ?, examples = ?, finished = ? WHERE id = ?",
            (status, json.dumps(metrics) if metrics is not None else None, json.dumps(identity) if identity else None,
             json.dumps(objectives) if objectives is not None else None, error, materialize_s, eval_s, examples,
             time.time(), cid),
        )

    def examples_scored(self) -> int:
        return int(self.db.execute("SELECT COALESCE(SUM(examples), 0) FROM candidates").fetchone()[0])

    def record_holdout(self, cid: int, holdout: dict) -> None:
        self.db.execute("UPDATE candidates SET holdout = ? WHERE id = ?", (json.dumps(holdout), cid))

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
