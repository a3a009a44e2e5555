"""`evomerge plot DIR`: PNG pictures of a campaign, each carrying the numbers it draws.

Each plot is a pair: a function that computes its data from the journal (plain JSON), and one
that draws that data. The data goes into the PNG as a text chunk named "evomerge"
(`read_plot_data(path)`, or `PIL.Image.open(path).text["evomerge"]`), so a test, the report or a
user can read exactly what a picture shows without reading pixels. A plot with nothing to show
(no finished candidate, no parameter-space recipe for the coefficients, no path for the path
plot) is not drawn.

    fitness.png       best and median fitness per generation, one panel per objective
    front.png         the Pareto front with its held-out scores (1 objective: fitness vs held-out)
    hypervolume.png   hypervolume per generation, against the campaign's fixed reference
    coefficients.png  parameter space: the winner's coefficients per source over the layer groups
    path.png          data flow: the winner's layer path, by source model, with its scales

Data (JSON in the "evomerge" text chunk; every plot has "kind"):

    fitness       {objectives: {name: {direction, generation: [g], best: [..], median: [..],
                   best_so_far: [..], values: [[every done candidate's value]], done: [count],
                   raced: [count], failed: [count]}},
                   raced: [{id, generation, objectives}]}   # stopped early: partial, not in best/median
    front         {objectives: [name], directions: [..], points: [{id, generation, <name>: value}],
                   front: [{id, generation, fitness: {name: v}, holdout: {name: v}, duplicates: [id]}],
                   holdout_points: [{id, fitness, holdout, front: bool}], baselines: {model: {name: v}}}
    hypervolume   {generation: [g], hypervolume: [..], evaluated: [n], reference: {name: v}}
    coefficients  {candidate, method, groups: [group in model order], families: [..],
                   parameters: {param: {source: {cells: ["block.2/mlp" | "embeddings" | "all"], values: [..]}}}}
    path          {candidate, lead, models: [name], steps: [{model, layer, scale}]}
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from evomerge.config import Campaign
from evomerge.errors import EvomergeError
from evomerge.journal import CandidateRow

DPI = 100
TEXT_KEY = "evomerge"


@dataclass
class Facts:
    """What every plot reads: the campaign, its rows, checkpoints and baselines."""

    campaign: Campaign
    rows: list[CandidateRow]
    checkpoints: list[dict]
    hv_reference: dict | None
    baselines: dict
    front: list  # view.Member, in candidate order

    @property
    def winner(self):
        """The best front member on the first objective (what `export --best` writes)."""
        from evomerge.view import winner_of

        return winner_of(self.front, self.campaign.objectives[0])



def read_facts(folder: str | Path) -> Facts:
    from evomerge.view import front_members, open_campaign

    journal, campaign = open_campaign(folder)
    try:
        return Facts(campaign, journal.candidates(), journal.checkpoints(), journal.get("hv_reference"),
                     journal.get("baselines") or {}, front_members(journal, campaign))
    finally:
        journal.close()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


# -- data ------------------------------------------------------------------------------------------


def fitness_data(f: Facts) -> dict | None:
    """Best and median fitness per generation, and the best so far. Failed candidates have no score;
    raced ones (stopped early) have partial scores: both are left out of best and median, counted
    per generation, and the raced ones listed with their partial scores."""
    done = [r for r in f.rows if r.status == "done"]
    if not done:
        return None
    raced = [r for r in f.rows if r.status == "raced"]
    generations = sorted({r.generation for r in done})
    out: dict = {"kind": "fitness", "objectives": {},
                 "raced": [{"id": r.id, "generation": r.generation, "objectives": r.objectives} for r in raced]}
    for o in f.campaign.objectives:
        pick = max if o.direction == "maximize" else min
        best, median, so_far, every = [], [], [], []
        for g in generations:
            values = [r.objectives[o.name] for r in done if r.generation == g and _number(r.objectives.get(o.name))]
            every.append(values)
            best.append(pick(values) if values else None)
            median.append(statistics.median(values) if values else None)
            seen = [b for b in best if b is not None]
            so_far.append(pick(seen) if seen else None)
        out["objectives"][o.name] = {
            "direction": o.direction, "generation": generations, "best": best, "median": median,
            "best_so_far": so_far, "values": every,
            "done": [sum(r.generation == g for r in done) for g in generations],
            "raced": [sum(r.generation == g for r in raced) for g in generations],
            "failed": [sum(r.generation == g and r.status == "failed" for r in f.rows) for g in generations]}
    return out


def front_data(f: Facts) -> dict | None:
    """Every finished candidate, the front with its held-out scores, every candidate with held-out
    scores, and the baselines (held-out). With one objective and no held-out score anywhere there is
    nothing beyond fitness.png to draw."""
    done = [r for r in f.rows if r.status == "done"]
    if not done:
        return None
    names = [o.name for o in f.campaign.objectives]

    def scores(values: dict | None) -> dict:
        return {k: values[k] for k in names if _number((values or {}).get(k))}

    front_ids = {m.id for m in f.front}
    held = [r for r in done if scores(r.holdout)]
    baselines = {n: scores(s) for n, s in f.baselines.items() if isinstance(s, dict) and scores(s)}
    if len(names) == 1 and not held and not baselines:
        return None
    return {"kind": "front", "objectives": names, "directions": [o.direction for o in f.campaign.objectives],
            "points": [{"id": r.id, "generation": r.generation, **scores(r.objectives)} for r in done],
            "front": [{"id": m.id, "generation": m.generation, "fitness": scores(m.objectives),
                       "holdout": scores(m.holdout), "duplicates": list(m.duplicates)} for m in f.front],
            "holdout_points": [{"id": r.id, "fitness": scores(r.objectives), "holdout": scores(r.holdout),
                                "front": r.id in front_ids} for r in held],
            "baselines": baselines}


def hypervolume_data(f: Facts) -> dict | None:
    points = [c for c in f.checkpoints if _number(c.get("hypervolume"))]
    if not points:
        return None
    return {"kind": "hypervolume", "generation": [c["generation"] for c in points],
            "hypervolume": [c["hypervolume"] for c in points], "evaluated": [c["evaluated"] for c in points],
            "reference": f.hv_reference}


def group_order(group: str) -> tuple:
    """Model order of layer groups: embeddings, block.0 .. block.N, final_norm, lm_head, the rest."""
    if group.startswith("block.") and group[6:].isdigit():
        return (1, int(group[6:]), group)
    rank = {"all": (0, 0), "embeddings": (0, 1), "final_norm": (2, 0), "lm_head": (2, 1)}
    return (*rank.get(group, (3, 0)), group)


def _cell(label: str) -> tuple[str, str]:
    group, _, family = label.partition("/")
    return group, family


def coefficients_data(f: Facts) -> dict | None:
    """The winner's coefficients, per searched parameter and source (parameter-space campaigns only):
    one value per cell (layer group, or group and tensor family), exactly as its recipe's rules hold them
    (the closing catch-all rule, the mean of the others, is left out); a global recipe has one cell, "all"."""
    best = f.winner
    if best is None or f.campaign.search_space.get("kind") != "ps" or not isinstance(best.recipe.get("sources"), list):
        return None
    searched = list(f.campaign.search_space.get("parameters") or {})
    by_path = {ref: name for name, ref in f.campaign.sources.items()}
    params: dict = {}
    for k, source in enumerate(best.recipe["sources"]):
        name = by_path.get(source.get("model"), list(f.campaign.sources)[k] if k < len(f.campaign.sources) else
                           f"source {k}")
        for p in searched:
            setting = (source.get("parameters") or {}).get(p)
            if _number(setting):
                cells, values = ["all"], [float(setting)]
            elif isinstance(setting, list) and all(isinstance(r, dict) for r in setting):
                rules = [r for r in setting if "group" in r and _number(r.get("value"))]
                cells = [r["group"] + (f"/{r['family']}" if r.get("family") else "") for r in rules]
                values = [float(r["value"]) for r in rules]
            else:
                continue
            if cells:
                params.setdefault(p, {})[name] = {"cells": cells, "values": values}
    if not params:
        return None
    labels = [c for by_source in params.values() for d in by_source.values() for c in d["cells"]]
    groups = sorted({_cell(c)[0] for c in labels}, key=group_order)
    families = sorted({_cell(c)[1] for c in labels} - {""})
    return {"kind": "coefficients", "candidate": best.id, "method": best.recipe.get("method"), "groups": groups,
            "families": families, "parameters": params}


def path_data(f: Facts) -> dict | None:
    best = f.winner
    if best is None or not isinstance(best.recipe.get("path"), list) or not best.recipe["path"]:
        return None
    recipe = best.recipe
    return {"kind": "path", "candidate": best.id, "lead": recipe.get("lead"), "models": list(recipe.get("models") or {}),
            "steps": [{"model": s["model"], "layer": s["layer"], "scale": s.get("scale", 1.0)} for s in recipe["path"]]}


# -- drawing ---------------------------------------------------------------------------------------
# Each function returns (width, height) in inches and draws onto a Figure of that size; the PNG is
# exactly width*DPI x height*DPI pixels.


def _size_fitness(data: dict) -> tuple[float, float]:
    return 8.0, 0.6 + 3.0 * len(data["objectives"])


def _size_front(data: dict) -> tuple[float, float]:
    n = len(data["objectives"])
    panels = 1 if n <= 2 else n * (n - 1) // 2
    return (7.0, 5.5) if panels == 1 else (min(5.0 * panels, 20.0), 5.0)


def _size_coefficients(data: dict) -> tuple[float, float]:
    legend = 0.0 if data["groups"] == ["all"] else 2.0
    return max(8.0, 2.0 + 0.35 * len(data["groups"])) + legend, 0.6 + 3.0 * len(data["parameters"])


def _size_path(data: dict) -> tuple[float, float]:
    return max(8.0, 2.0 + 0.3 * len(data["steps"])), 5.0


def draw_fitness(fig, data: dict) -> None:
    from matplotlib.ticker import MaxNLocator

    objectives = data["objectives"]
    axes = fig.subplots(len(objectives), 1, squeeze=False)[:, 0]
    for ax, (name, d) in zip(axes, objectives.items()):
        xs = [g for g, values in zip(d["generation"], d["values"]) for _ in values]
        ax.scatter(xs, [v for values in d["values"] for v in values], s=8, color="lightgray",
                   label="finished candidates")
        ax.plot(d["generation"], d["best"], "o-", label="best of generation")
        ax.plot(d["generation"], d["median"], "s--", label="median of generation")
        ax.plot(d["generation"], d["best_so_far"], ":", color="black", label="best so far")
        raced = [r for r in data["raced"] if _number((r["objectives"] or {}).get(name))]
        if raced:
            ax.scatter([r["generation"] for r in raced], [r["objectives"][name] for r in raced], marker="x", s=14,
                       color="gray", label="stopped by racing (partial, left out)")
        failed = sum(d["failed"])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("generation")
        ax.set_ylabel(f"{name} ({d['direction']})")
        ax.set_title(f"{name}: fitness by generation" + (f" ({failed} failed candidate(s) left out)" if failed else ""),
                     fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)


def draw_front(fig, data: dict) -> None:
    names = data["objectives"]
    if len(names) == 1:
        _draw_front_single(fig, data, names[0])
        return
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, (i, j) in zip(axes, pairs):
        x, y = names[i], names[j]
        pts = [p for p in data["points"] if x in p and y in p]
        ax.scatter([p[x] for p in pts], [p[y] for p in pts], s=12, color="lightgray", label="finished candidates")
        front = sorted((m for m in data["front"] if x in m["fitness"] and y in m["fitness"]),
                       key=lambda m: m["fitness"][x])
        fx, fy = [m["fitness"][x] for m in front], [m["fitness"][y] for m in front]
        if len(names) == 2:  # the attainment staircase of the front
            ax.step(fx, fy, where="pre" if data["directions"][i] == "maximize" else "post", color="tab:red", lw=1)
        ax.scatter(fx, fy, color="tab:red", s=36, zorder=3, label="front (fitness)")
        held = [m for m in front if x in m["holdout"] and y in m["holdout"]]
        for m in held:
            ax.plot([m["fitness"][x], m["holdout"][x]], [m["fitness"][y], m["holdout"][y]], lw=0.6, color="tab:blue")
        if held:
            ax.scatter([m["holdout"][x] for m in held], [m["holdout"][y] for m in held], marker="D", facecolors="none",
                       edgecolors="tab:blue", zorder=3, label="front (held-out)")
        for b, scores in data["baselines"].items():
            if x in scores and y in scores:
                ax.scatter([scores[x]], [scores[y]], marker="x", color="black")
                ax.annotate(b, (scores[x], scores[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{x} ({data['directions'][i]})")
        ax.set_ylabel(f"{y} ({data['directions'][j]})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_title("Pareto front; held-out beside fitness, baselines x", fontsize=10)


def _draw_front_single(fig, data: dict, name: str) -> None:
    """One objective: does fitness carry over to held-out examples? Front highlighted, baselines dotted."""
    ax = fig.subplots()
    pts = [p for p in data["holdout_points"] if name in p["holdout"] and name in p["fitness"]]
    rest = [p for p in pts if not p["front"]]
    top = [p for p in pts if p["front"]]
    ax.scatter([p["fitness"][name] for p in rest], [p["holdout"][name] for p in rest], s=24, color="gray",
               label="candidates with held-out scores")
    ax.scatter([p["fitness"][name] for p in top], [p["holdout"][name] for p in top], s=80, color="tab:red",
               zorder=3, label="front")
    for p in top:
        ax.annotate(f"#{p['id']}", (p["fitness"][name], p["holdout"][name]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    if pts:
        lo = min(min(p["fitness"][name], p["holdout"][name]) for p in pts)
        hi = max(max(p["fitness"][name], p["holdout"][name]) for p in pts)
        ax.plot([lo, hi], [lo, hi], lw=0.6, color="lightgray", label="held-out = fitness")
    for k, (b, scores) in enumerate(data["baselines"].items()):
        if name in scores:
            ax.axhline(scores[name], ls=":", lw=1, color=f"C{k % 10}", label=f"{b} (held-out)")
    ax.set_xlabel(f"{name}, fitness ({data['directions'][0]})")
    ax.set_ylabel(f"{name}, held-out")
    ax.set_title("fitness vs held-out; baselines dotted", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def draw_hypervolume(fig, data: dict) -> None:
    from matplotlib.ticker import MaxNLocator

    ax = fig.subplots()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot(data["generation"], data["hypervolume"], "o-")
    ref = ", ".join(f"{k}={v:.4g}" for k, v in (data["reference"] or {}).items())
    ax.set_title(f"hypervolume by generation (reference {ref or 'unset'})", fontsize=10)
    ax.set_xlabel("generation")
    ax.set_ylabel("hypervolume")
    ax.grid(alpha=0.3)


def draw_coefficients(fig, data: dict) -> None:
    params = data["parameters"]
    groups = data["groups"]
    axes = fig.subplots(len(params), 1, squeeze=False)[:, 0]
    styles = dict(zip(data["families"], ["-", "--", ":", "-."] * 4))
    for ax, (p, by_source) in zip(axes, params.items()):
        if groups == ["all"]:  # one value per source: bars
            sources = list(by_source)
            ax.bar(range(len(sources)), [d["values"][0] for d in by_source.values()],
                   color=[f"C{k % 10}" for k in range(len(sources))])
            ax.set_xticks(range(len(sources)))
            ax.set_xticklabels(sources)
        else:
            for k, (source, d) in enumerate(by_source.items()):
                color = f"C{k % 10}"
                lines: dict[str, tuple[list, list]] = {}
                for label, v in zip(d["cells"], d["values"]):
                    group, fam = _cell(label)
                    xs, ys = lines.setdefault(fam, ([], []))
                    xs.append(groups.index(group))
                    ys.append(v)
                for fam, (xs, ys) in lines.items():
                    order = sorted(range(len(xs)), key=xs.__getitem__)
                    xs, ys = [xs[i] for i in order], [ys[i] for i in order]
                    if fam or not data["families"]:
                        ax.plot(xs, ys, styles.get(fam, "-"), marker="o", ms=3, color=color,
                                label=source + (f" {fam}" if fam else ""))
                    else:  # embeddings, norms, head: no family, points of their own
                        ax.plot(xs, ys, "s", ms=5, color=color, label=f"{source} (non-block)")
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels(groups, rotation=60, fontsize=7)
        ax.set_ylabel(p)
        ax.grid(alpha=0.3)
    if groups != ["all"]:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    axes[0].set_title(f"coefficients of candidate #{data['candidate']} ({data['method']})"
                      + (" by layer group" if groups != ["all"] else ", one per source"), fontsize=10)


def draw_path(fig, data: dict) -> None:
    from matplotlib.ticker import MaxNLocator

    steps = data["steps"]
    ax = fig.subplots()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot(range(len(steps)), [s["layer"] for s in steps], color="lightgray", zorder=1)
    for k, model in enumerate(data["models"]):
        idx = [i for i, s in enumerate(steps) if s["model"] == model]
        if idx:
            ax.scatter(idx, [steps[i]["layer"] for i in idx], s=[20 + 40 * abs(steps[i]["scale"]) for i in idx],
                       color=f"C{k % 10}", label=model + (" (lead)" if model == data["lead"] else ""), zorder=2)
    for i, s in enumerate(steps):
        if abs(s["scale"] - 1.0) > 1e-3:
            ax.annotate(f"x{s['scale']:.3g}", (i, s["layer"]), fontsize=7, xytext=(3, 4), textcoords="offset points")
    ax.set_xlabel("step of the path")
    ax.set_ylabel("layer of its model")
    ax.set_title(f"layer path of candidate #{data['candidate']} ({len(steps)} layers; marker size and labels: "
                 "transition scale)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


# name -> (data from the journal, drawing onto a Figure, figure size in inches for that data)
PLOTS: dict[str, tuple[Callable[[Facts], dict | None], Callable, Callable[[dict], tuple[float, float]]]] = {
    "fitness": (fitness_data, draw_fitness, _size_fitness),
    "front": (front_data, draw_front, _size_front),
    "hypervolume": (hypervolume_data, draw_hypervolume, lambda data: (8.0, 4.0)),
    "coefficients": (coefficients_data, draw_coefficients, _size_coefficients),
    "path": (path_data, draw_path, _size_path),
}


def size_of(name: str, data: dict) -> tuple[float, float]:
    """The figure size (inches) a plot of `data` gets; the PNG is exactly that times DPI pixels."""
    return PLOTS[name][2](data)


def plot_data(folder: str | Path) -> dict[str, dict]:
    """The data of every plot of one campaign folder that has something to show, without drawing."""
    facts = read_facts(folder)
    return {name: data for name, (compute, _, _) in PLOTS.items() if (data := compute(facts)) is not None}


def make_plots(folder: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write each plot that has something to show as OUT/<name>.png (default OUT: DIR/plots) and
    return their paths; a staged campaign gets one subfolder per started stage, OUT/<stage>/."""
    from evomerge.hybrid import is_staged_folder, staged_folders

    folder = Path(folder)
    out = Path(out_dir) if out_dir is not None else folder / "plots"
    if is_staged_folder(folder):
        return [p for name, sub in staged_folders(folder) for p in make_plots(sub, out / name)]
    datas = plot_data(folder)
    if not datas:
        return []
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvomergeError(f"cannot write plots to {out} ({exc.strerror or exc}); pass --out FOLDER you can "
                            "write to") from None
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # files only, never a window; no pyplot state
    from matplotlib.figure import Figure

    written = []
    for name, data in datas.items():
        fig = Figure(figsize=size_of(name, data), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        PLOTS[name][1](fig, data)
        written.append(_save(fig, out / f"{name}.png", data))
    return written


def _save(fig, path: Path, data: dict) -> Path:
    from evomerge.checkpoint import atomic_file

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, metadata={TEXT_KEY: json.dumps(data, allow_nan=False)})
    except OSError as exc:
        raise EvomergeError(f"cannot write {path} ({exc.strerror or exc}); pass --out FOLDER you can write to") from None
    return path


def read_plot_data(path: str | Path) -> dict:
    """The data a PNG written by `make_plots` draws."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            text = dict(getattr(image, "text", {}) or {})
    except (OSError, ValueError) as exc:
        raise EvomergeError(f"cannot read {path} as a PNG ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None
    if TEXT_KEY not in text:
        raise EvomergeError(f"{path} carries no evomerge plot data; it was not written by `evomerge plot`")
    return json.loads(text[TEXT_KEY])
