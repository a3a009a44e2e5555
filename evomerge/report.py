"""`evomerge report DIR`: one self-contained HTML page about a campaign.

Everything is inline — styles, and the plots as data: URIs; no script, no link, no external URL —
so the file opens offline, mails as one attachment and shows the same thing in a year. Sections:
summary (name, evaluated/budget, done or not, front size, best per objective), held-out table
(base, each source, uniform beside the front), the front, the plots (`evomerge plot`'s PNGs, each
carrying its numbers), the winner's recipe, timings (per candidate and per session), failures, and
the config. A staged campaign gets one set of sections per stage. Every value is escaped.
"""

from __future__ import annotations

import base64
import html
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from evomerge.errors import EvomergeError

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}pre{background:#f7f7f7;padding:.6em;
overflow-x:auto;font-size:12px}img{max-width:100%;border:1px solid #eee;margin:.4em 0}.err{color:#a00}
tr.win td{font-weight:bold}section.stage{border-top:2px solid #888;margin-top:2em}"""


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of campaign folder DIR (default DIR/report.html) atomically; return its path."""
    from evomerge.hybrid import is_staged_folder, staged_folders

    folder = Path(folder)
    out = Path(out) if out is not None else folder / "report.html"
    if is_staged_folder(folder):
        stages = staged_folders(folder)
        intro = (f"<p>A staged campaign: {len(stages)} stage(s) started"
                 + (f" ({html.escape(', '.join(name for name, _ in stages))})" if stages else "")
                 + "; one section per stage.</p>")
        sections = [f'<section class="stage">{_campaign_section(sub, name)}</section>' for name, sub in stages]
    else:
        intro, sections = "", [_campaign_section(folder, "")]
    title = html.escape(f"evomerge report: {folder.resolve().name}")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{STYLE}</style>"
            f"</head><body><h1>{title}</h1><p>written {time.strftime('%Y-%m-%d %H:%M:%S')} from "
            f"<code>{html.escape(str(folder))}</code></p>{intro}" + "\n".join(sections) + "</body></html>\n")
    _write_atomically(out, page)
    return out


def _campaign_section(folder: Path, stage: str) -> str:
    from evomerge.plots import make_plots
    from evomerge.view import campaign_view, open_campaign, winner_of

    journal, campaign = open_campaign(folder)
    try:
        view = campaign_view(journal, campaign)
        config = journal.get("config")
        baselines = journal.get("baselines") or {}
        sessions = journal.get("sessions") or []
        holdout_identity = journal.get("holdout_identity") or []
        rows = journal.candidates()
    finally:
        journal.close()
    with tempfile.TemporaryDirectory() as tmp:
        images = [(p.stem, base64.b64encode(p.read_bytes()).decode("ascii")) for p in make_plots(folder, tmp)]
    objectives = [o.name for o in campaign.objectives]
    winner = winner_of(view.front, campaign.objectives[0])
    heading = f"stage {stage}: {view.name}" if stage else view.name
    parts = [f"<h2>{html.escape(heading)}</h2>", _summary(view, campaign),
             "<h3>Held-out: the front beside the baselines</h3>",
             _holdout_table(view, baselines, campaign, winner, holdout_identity),
             "<h3>Pareto front</h3>", _front_table(view, objectives, winner),
             "<h3>Plots</h3>"]
    parts += [f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
              f"<figcaption>{html.escape(name)}.png</figcaption></figure>" for name, data in images]
    if not images:
        parts.append("<p>Nothing to plot yet (no finished candidate).</p>")
    if winner is not None:
        parts += [f"<h3>Winner: candidate #{winner.id} (best {html.escape(objectives[0])} on the front)</h3>",
                  f"<p>export it with <code>evomerge export {html.escape(shlex.quote(str(folder)))} OUT_DIR "
                  f"--candidate {winner.id}</code></p>",
                  "<pre>" + html.escape(yaml.safe_dump(winner.recipe, sort_keys=False)) + "</pre>"]
    parts += ["<h3>Timings</h3>", _timings(rows, sessions), "<h3>Failures</h3>", _failures(rows, baselines),
              "<h3>Config</h3>", "<pre>" + html.escape(yaml.safe_dump(config, sort_keys=False)) + "</pre>"]
    return "\n".join(parts)


def _value(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return html.escape(str(v))
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}" if v != 0 and abs(v) < 0.01 else f"{v:.4f}"


def _table(header: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join((f'<tr class="{c}">' if c else "<tr>") + "".join(f"<td>{_value(v)}</td>" for v in row) + "</tr>"
                   for row, c in zip(rows, classes or [""] * len(rows)))
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary(view, campaign) -> str:
    rows = [["campaign", view.name],
            ["status", f"{view.evaluated}/{view.budget} candidates evaluated, {view.state}"],
            ["failed / stopped by racing / pending", f"{view.failed} / {view.raced} / {view.pending}"],
            ["generations", view.generations],
            ["front size", len(view.front)],
            ["examples scored", view.examples_scored]]
    for o in campaign.objectives:
        best = view.best.get(o.name)
        rows.append([f"best {o.name} ({o.direction})", best if best is not None else "-"])
    return _table(["", ""], rows)


def _holdout_table(view, baselines: dict, campaign, winner, identity: list) -> str:
    """Rows: base, each source, uniform (the baselines), then the front members with held-out scores;
    columns: the metrics, then the objectives."""
    from evomerge.view import holdout_rows

    members = [m for m in view.front if m.holdout]
    if not members and not baselines:
        return "<p>No held-out scores (the config has no <code>holdout</code> block, or they are not scored yet).</p>"
    columns, base_rows = holdout_rows(campaign, baselines)
    scored = [s for s in [*baselines.values(), *(m.holdout for m in members)] if isinstance(s, dict) and "error" not in s]
    columns = list(dict.fromkeys(columns + [k for s in scored for k in s]))
    columns = [c for c in columns if any(c in s for s in scored)]

    def cells(scores: dict) -> list:
        if "error" in scores:
            return [f"error: {scores['error']}"] + ["-"] * (len(columns) - 1)
        return [scores.get(c, "-") for c in columns]

    rows = [[name] + cells(scores) for name, scores in base_rows]
    classes = [""] * len(rows)
    for m in members:
        rows.append([f"front #{m.id}" + (" (winner)" if winner is not None and m.id == winner.id else "")]
                    + cells(m.holdout))
        classes.append("win" if winner is not None and m.id == winner.id else "")
    text = _table(["model", *columns], rows, classes)
    if identity:
        text += "<p>held-out sets: " + html.escape("; ".join(
            f"{i.get('task')} [split {i.get('split')}, n={i.get('n')}]" for i in identity if isinstance(i, dict))) + "</p>"
    return text


def _front_table(view, objectives: list[str], winner) -> str:
    if not view.front:
        return "<p>No finished candidate yet.</p>"
    rows, classes = [], []
    for m in view.front:
        if "error" in m.holdout:
            held = f"error: {m.holdout['error']}"
        else:
            held = ", ".join(f"{k}={_value(v)}" for k, v in m.holdout.items()) or "-"
        rows.append([f"#{m.id}", m.generation, *[m.objectives.get(o, "-") for o in objectives], held,
                     ", ".join(f"#{d}" for d in m.duplicates) or "-"])
        classes.append("win" if winner is not None and m.id == winner.id else "")
    return _table(["candidate", "generation", *objectives, "held-out", "tied duplicates"], rows, classes)


def _timings(rows, sessions: list[dict]) -> str:
    out = []
    for label, values in (("materialize (s)", [r.materialize_s for r in rows if r.materialize_s is not None]),
                          ("evaluate (s)", [r.eval_s for r in rows if r.eval_s is not None])):
        if values:
            out.append([label, len(values), statistics.median(values), statistics.fmean(values), float(sum(values))])
    text = _table(["per candidate", "candidates", "median", "mean", "total"], out) if out else "<p>No timings yet.</p>"
    if sessions:
        text += _table(["session started", "executor", "start-up (s)", "wall (s)", "waiting for workers (s)",
                        "evaluated after"],
                       [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.get("started") or 0)),
                         s.get("executor", "-"), *[_seconds(s.get(k)) for k in ("startup_s", "wall_s", "waiting_s")],
                         s.get("evaluated", "-")] for s in sessions if isinstance(s, dict)])
    return text


def _seconds(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _failures(rows, baselines: dict) -> str:
    failed = [[f"#{r.id}", r.generation, r.error_kind or "candidate", r.error or ""] for r in rows
              if r.status == "failed"]
    failed += [[f"#{r.id}", r.generation, f"infrastructure (pending, {r.attempts} attempt(s))", r.last_error]
               for r in rows if r.status == "pending" and r.last_error]
    failed += [[f"#{r.id}", r.generation, "held-out", r.holdout["error"]] for r in rows
               if isinstance(r.holdout, dict) and "error" in r.holdout]
    failed += [[name, "-", "baseline (held-out)", s["error"]] for name, s in baselines.items()
               if isinstance(s, dict) and "error" in s]
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
        raise EvomergeError(f"cannot write {path} ({exc.strerror or exc}); pass --out FILE somewhere you can "
                            "write") from None
