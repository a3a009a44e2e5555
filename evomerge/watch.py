"""`evomerge status DIR --watch`: a campaign's progress, refreshed from its journal while it runs.

A watcher only reads (the journal is SQLite in WAL mode, so reading never blocks the runner) and
never takes the campaign lock; it reads the lock only to tell "running" from "stopped". On a
terminal it redraws one panel (rich); into a file or a pipe (a cluster job's log) it prints a
line whenever the count of evaluated candidates changes. It ends when the campaign is done.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TextIO

from evomerge.errors import EvomergeError


def snapshot(folder: Path) -> tuple[list[str], int, int, bool]:
    """(status lines, evaluated, budget, done) of the campaign, or of its current stage."""
    from evomerge.hybrid import final_folder, staged_status
    from evomerge.lock import CampaignLock
    from evomerge.view import load_view, status_lines

    stages = staged_status(folder) or []
    current = final_folder(folder)
    view = load_view(current)
    lines = stages + status_lines(view)
    if not view.done:
        holder = CampaignLock(current).holder()
        lines.append(f"  runner: pid {holder['pid']} on {holder['host']}" if holder else
                     f"  runner: none (stopped; continue with `evomerge resume {folder}`)")
    done = view.done and not any("not started" in s or "running or stopped" in s for s in stages)
    return lines, view.evaluated, view.budget, done


def watch(folder: str | Path, interval: float = 2.0, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    folder = Path(folder)
    if not (math.isfinite(interval) and interval > 0):
        raise EvomergeError(f"--interval {interval}: give a number of seconds above 0")
    snapshot(folder)  # a wrong folder is one line now, not a blank screen
    try:
        if out.isatty():
            _live(folder, interval, out)
        else:
            _log(folder, interval, out)
    except KeyboardInterrupt:  # leaving a watch is how a watch ends: the campaign is not touched
        return


def _live(folder: Path, interval: float, out: TextIO) -> None:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress_bar import ProgressBar
    from rich.text import Text

    def panel():
        lines, evaluated, budget, done = snapshot(folder)
        bar = ProgressBar(total=max(budget, 1), completed=min(evaluated, budget), width=50)
        return Group(Text(lines[0]), bar, Text("\n".join(lines[1:]))), done

    with Live(console=Console(file=out), auto_refresh=False) as live:
        while True:
            renderable, done = panel()
            live.update(renderable, refresh=True)
            if done:
                return
            time.sleep(interval)


def _log(folder: Path, interval: float, out: TextIO) -> None:
    last = None
    while True:
        lines, evaluated, _, done = snapshot(folder)
        if (evaluated, done) != last:
            stamp = time.strftime("%H:%M:%S")
            brief = [ln.strip() for ln in lines[1:] if ln.strip().startswith(("best", "runner", "stage"))]
            out.write(f"[{stamp}] " + " | ".join([lines[0].strip(), *brief]) + "\n")
            out.flush()
            last = (evaluated, done)
        if done:
            return
        time.sleep(interval)
