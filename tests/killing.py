"""Start `evomerge run` in a child process and kill it once its journal holds enough results."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


def finished(db: Path, where: str) -> int:
    """Candidates matching `where` in a journal another process is writing (0 while it is busy)."""
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(db, timeout=1)
        try:
            return con.execute(f"SELECT COUNT(*) FROM candidates WHERE {where}").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


def run_until(config: Path, folder: Path, db: Path, at_least: int, where: str = "status = 'done'",
              sig: int = signal.SIGKILL, timeout: float = 180, **popen) -> tuple[subprocess.Popen, int]:
    """Run the campaign until `db` holds `at_least` candidates matching `where` (or the run ends),
    then send `sig`. Returns the process (waited for unless `popen` asks for pipes) and the count seen."""
    proc = subprocess.Popen([sys.executable, "-m", "evomerge", "run", str(config), "--out", str(folder), "--quiet"],
                            env=dict(os.environ, HF_HUB_OFFLINE="1"),
                            **({"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} | popen))
    deadline, seen = time.time() + timeout, 0
    while time.time() < deadline and proc.poll() is None:
        seen = finished(db, where)
        if seen >= at_least:
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    if not popen:
        proc.wait()
    return proc, seen
