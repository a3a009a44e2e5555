"""`evomerge report DIR`: one self-contained HTML page about a campaign.

Everything is inline — styles, and the plots as data: URIs — so the file opens offline, mails as
one attachment and shows the same thing in a year. Sections: status, held-out table (baselines
beside the front), front, plots, the winner's recipe, timings, failures, and the config. A staged
campaign gets one set of sections per stage. Every value is escaped.
"""

from __future__ import annotations

import base64
import html
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from evomerge.errors import EvomergeError

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}pre{background:#f7f7f7;padding:.6em;
overflow-x:auto;font-size:12px}img{max-width:100%;border:1px solid #eee;margin:.4em 0}.err{color:#a00}"""


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    from evomerge.hybrid import is_staged_folder, staged_folders

    folder = Path(folder)
    out = Path(out) if out else folder / "report.html"
    stages = staged_folders(folder) if is_staged_folder(folder) else [("", folder)]
    sections = [_campaign_section(sub, name) for name, sub in stages]
    title = html.escape(f"evomerge report: {folder.name}")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{STYLE}</style>"
            f"</head><body><h1>{title}</h1><p>written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
            + "".join(sections) + "</body></html>\n")
    _write_atomically(out, page)
    return out


def _campaign_section(folder: Path, stage: str) -> str:
    from evomerge.journal import Journal
    from evomerge.plots import make_plots
    from evomerge.view import load_view, status_lines

    view = load_view(folder)
    journal = Journal(folder, create=False)
    try:
        config = journal.get("config")
        baselines = journal.get("baselines") or {}
        sessions = journal.get("sessions") or []
        rows = journal.candidates()
    finally:
        journal.close()
    with tempfile.TemporaryDirectory() as tmp:
        images = [(p.stem, base64.b64encode(p.read_bytes()).decode()) for p in make_plots(folder, tmp)]
    objectives = [o["name"] for o in config["objectives"]]
    winner = _winner(view, config)
    parts = [f"<h2>{html.escape('stage ' + stage if stage else view.name)}</h2>",
             "<pre>" + html.escape("\n".join(status_lines(view))) + "</pre>",
             "<h3>Held-out: the front beside the baselines</h3>", _holdout_table(view, baselines, objectives),
             "<h3>Pareto front</h3>", _front_table(view, objectives),
             "<h3>Plots</h3>"]
    parts += [f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
              f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, data in images]
    if winner is not None:
        parts += [f"<h3>Winner: candidate #{winner.id} (best {html.escape(objectives[0])})</h3>",
                  "<pre>" + html.escape(yaml.safe_dump(winner.recipe, sort_keys=False)) + "</pre>"]
    parts += ["<h3>Timings</h3>", _timings(rows, sessions), "<h3>Failures</h3>", _failures(rows),
              "<h3>Config</h3>", "<pre>" + html.escape(yaml.safe_dump(config, sort_keys=False)) + "</pre>"]
    return "\n".join(parts)


def _winner(view, config: dict):
    if not view.front:
        return None
    first = config["objectives"][0]
    sign = -1.0 if first.get("direction") == "minimize" else 1.0
    return max(view.front, key=lambda m: sign * m.objectives[first["name"]])


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _holdout_table(view, baselines: dict, objectives: list[str]) -> str:
    members = [m for m in view.front if any(isinstance(v, float) for v in m.holdout.values())]
    if not members and not baselines:
        return "<p>No held-out scores (the config has no <code>holdout</code> block).</p>"
    scored = [s for s in list(baselines.values()) + [m.holdout for m in members] if "error" not in s]
    metrics = list(dict.fromkeys(k for s in scored for k in s if k not in objectives))
    columns = [c for c in metrics + objectives if any(c in s for s in scored)]
    baselines = dict(sorted(baselines.items(), key=lambda kv: (kv[0] != "base", kv[0] == "uniform")))
    rows = [[name] + ([s["error"]] + ["-"] * (len(columns) - 1) if "error" in s else [s.get(c, "-") for c in columns])
            for name, s in baselines.items()]
    rows += [[f"front #{m.id}"] + [m.holdout.get(c, "-") for c in columns] for m in members]
    return _table(["model", *columns], rows)


def _front_table(view, objectives: list[str]) -> str:
    if not view.front:
        return "<p>No finished candidate yet.</p>"
    rows = []
    for m in view.front:
        held = ", ".join(f"{k}={v:.4g}" for k, v in m.holdout.items() if isinstance(v, float))
        rows.append([f"#{m.id}", m.generation, *[m.objectives[o] for o in objectives], held or "-",
                     ", ".join(f"#{d}" for d in m.duplicates) or "-"])
    return _table(["candidate", "generation", *objectives, "held-out", "tied duplicates"], rows)


def _timings(rows, sessions: list[dict]) -> str:
    out = []
    for label, values in (("materialize (s)", [r.materialize_s for r in rows if r.materialize_s is not None]),
                          ("evaluate (s)", [r.eval_s for r in rows if r.eval_s is not None])):
        if values:
            out.append([label, len(values), statistics.median(values), statistics.fmean(values), sum(values)])
    text = _table(["per candidate", "candidates", "median", "mean", "total"], out) if out else "<p>No timings yet.</p>"
    if sessions:
        text += _table(["session started", "executor", "start-up (s)", "wall (s)", "waiting for workers (s)",
                        "evaluated after"],
                       [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.get("started", 0))), s.get("executor"),
                         float(s.get("startup_s", 0)), float(s.get("wall_s", 0)), float(s.get("waiting_s", 0)),
                         s.get("evaluated")] for s in sessions])
    return text


def _failures(rows) -> str:
    failed = [[f"#{r.id}", r.generation, r.error_kind or "candidate", r.error or ""] for r in rows if r.status == "failed"]
    failed += [[f"#{r.id}", r.generation, "infrastructure (pending)", r.last_error] for r in rows
               if r.status == "pending" and r.last_error]
    if not failed:
        return "<p>None.</p>"
    return '<div class="err">' + _table(["candidate", "generation", "kind", "error"], failed) + "</div>"


def _write_atomically(path: Path, text: str) -> None:
    from evomerge.checkpoint import atomic_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise EvomergeError(f"cannot write {path} ({exc.strerror}); pass --out FILE somewhere you can write") from None
