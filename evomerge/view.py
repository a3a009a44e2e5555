"""One read model of a campaign, computed from the journal alone.

`evomerge status`, `front`, `inspect`, their `--json`, the demo's table, the plots, the HTML report
and `status --watch` all render from `CampaignView`, `Member` and the journal's rows; nothing else
recomputes fronts or tallies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from evomerge import archive
from evomerge.config import Campaign, parse_campaign
from evomerge.errors import EvomergeError
from evomerge.journal import CandidateRow, Journal


@dataclass
class Member:
    """A point of the Pareto front: the earliest candidate with its objective values, and its ties."""

    id: int
    generation: int
    objectives: dict
    metrics: dict
    holdout: dict
    genome: list[float]
    recipe: dict
    duplicates: list[int] = field(default_factory=list)  # later candidates with identical objectives

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class CampaignView:
    name: str
    folder: str
    budget: int
    evaluated: int  # done + raced + failed
    failed: int
    raced: int
    pending: int
    examples_scored: int
    generations: int  # checkpointed generations
    done: bool
    best: dict[str, float]
    front: list[Member]
    hypervolume: list[float]  # one per generation, against a fixed reference: non-decreasing
    hv_reference: dict | None
    eval_seconds: float
    infrastructure_errors: list[dict]  # pending candidates whose last attempt failed for a reason not their own

    @property
    def state(self) -> str:
        return "done" if self.done else ("running or stopped" if self.evaluated < self.budget else "finishing")

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "front"}
        out["front_size"] = len(self.front)
        out["front"] = [m.id for m in self.front]
        return out


def winner_of(front: list, objective):
    """The front member (or row) best on `objective`, the earliest on a tie; None for an empty front.
    What `export --best`, the demo, the card, the plots and the report all call the winner."""
    if not front:
        return None
    sign = 1.0 if objective.direction == "maximize" else -1.0
    return max(front, key=lambda m: sign * m.objectives[objective.name])


def holdout_rows(campaign: Campaign, baselines: dict) -> tuple[list[str], list[tuple[str, dict]]]:
    """The held-out table's baseline rows in reading order (base, each source, uniform, the rest) and the
    score columns (metrics, then objectives) that the baselines or the campaign's objectives name."""
    objectives = [o.name for o in campaign.objectives]
    order = [n for n in ("base", *campaign.sources, "uniform") if n in baselines]
    order += [n for n in baselines if n not in order]
    scored = [s for s in baselines.values() if isinstance(s, dict) and "error" not in s]
    metrics = [m for o in campaign.objectives for m in o.metrics]
    metrics += [k for s in scored for k in s if k not in metrics and k not in objectives]
    return list(dict.fromkeys(metrics + objectives)), [(n, baselines[n]) for n in order]


def front_rows(journal: Journal, campaign: Campaign) -> list[tuple[CandidateRow, list[int]]]:
    """(row, duplicate ids) per distinct front point, in candidate order."""
    rows = journal.candidates("done")
    points = archive.front(campaign.objectives, [r.objectives for r in rows])
    return [(rows[p.index], [rows[i].id for i in p.duplicates]) for p in points]


def front_members(journal: Journal, campaign: Campaign) -> list[Member]:
    return [Member(r.id, r.generation, r.objectives, r.metrics, dict(r.holdout or {}), r.genome, r.recipe, dups)
            for r, dups in front_rows(journal, campaign)]


def campaign_view(journal: Journal, campaign: Campaign) -> CampaignView:
    rows = journal.candidates()
    done_rows = [r for r in rows if r.status == "done"]
    best = {}
    for o in campaign.objectives:
        vals = [r.objectives[o.name] for r in done_rows]
        if vals:
            best[o.name] = max(vals) if o.direction == "maximize" else min(vals)
    cps = journal.checkpoints()
    return CampaignView(
        name=campaign.name,
        folder=str(journal.folder),
        budget=campaign.budget,
        evaluated=sum(r.status in ("done", "raced", "failed") for r in rows),
        failed=sum(r.status == "failed" for r in rows),
        raced=sum(r.status == "raced" for r in rows),
        pending=sum(r.status == "pending" for r in rows),
        examples_scored=journal.examples_scored(),
        generations=len(cps),
        done=bool(journal.get("done", False)),
        best=best,
        front=front_members(journal, campaign),
        hypervolume=[c["hypervolume"] for c in cps],
        hv_reference=journal.get("hv_reference"),
        eval_seconds=round(sum((r.eval_s or 0) + (r.materialize_s or 0) for r in rows), 2),
        infrastructure_errors=[{"id": r.id, "attempts": r.attempts, "error": r.last_error}
                               for r in rows if r.status == "pending" and r.last_error],
    )


def open_campaign(folder: str | Path) -> tuple[Journal, Campaign]:
    """The journal of an existing campaign folder and the config it was started with."""
    folder = Path(folder)
    journal = Journal(folder, create=False)
    config = journal.get("config")
    if config is None:
        journal.close()
        raise EvomergeError(f"{folder}/journal.sqlite holds no campaign config (its start failed before pre-flight "
                            f"passed, or the journal is damaged); start it with `evomerge run CONFIG --out {folder}`")
    try:
        return journal, parse_campaign(config, f"{folder}/journal.sqlite")
    except EvomergeError:
        journal.close()
        raise


def load_view(folder: str | Path) -> CampaignView:
    journal, campaign = open_campaign(folder)
    try:
        return campaign_view(journal, campaign)
    finally:
        journal.close()


def campaign_status(folder: str | Path) -> dict:
    return load_view(folder).to_json()


def candidate_detail(folder: str | Path, cid: int) -> dict:
    """One candidate: recipe, metrics with the identity of what measured them, timings, error; and the
    identity of the campaign's held-out measurements."""
    journal, _ = open_campaign(folder)
    try:
        row = journal.candidate(cid)
        holdout_identity = journal.get("holdout_identity")
        last = journal.count("pending", "done", "raced", "failed")
    finally:
        journal.close()
    if row is None:
        raise EvomergeError(f"{folder} has no candidate #{cid}" + (f" (ids run 1-{last}); see `evomerge front "
                                                                 f"{folder}`" if last else " yet"))
    return {**asdict(row), "holdout_identity": holdout_identity}


# -- text renderings --------------------------------------------------------------------------


def status_lines(view: CampaignView) -> list[str]:
    lines = [f"{view.name}: {view.evaluated}/{view.budget} candidates evaluated ({view.failed} failed, "
             f"{view.raced} stopped by racing), {view.generations} generation(s), {view.state}"]
    for k, v in view.best.items():
        lines.append(f"  best {k}: {v:.4g}")
    lines.append(f"  front: {len(view.front)} point(s)"
                 + (f" ({sum(len(m.duplicates) for m in view.front)} tied duplicate(s) folded in)"
                    if any(m.duplicates for m in view.front) else ""))
    if view.hypervolume:
        ref = ", ".join(f"{k}={v:.4g}" for k, v in (view.hv_reference or {}).items())
        lines.append(f"  hypervolume by generation (reference {ref or 'not set yet'}): "
                     + ", ".join(f"{h:.4g}" for h in view.hypervolume))
    for e in view.infrastructure_errors:
        lines.append(f"  candidate #{e['id']} pending after {e['attempts']} attempt(s): {e['error']}")
    return lines


def front_lines(front: list[Member]) -> list[str]:
    lines = [f"front: {len(front)} point(s)"]
    for m in front:
        objs = ", ".join(f"{k}={v:.4g}" for k, v in m.objectives.items())
        hold = ", ".join(f"{k}={v:.4g}" for k, v in m.holdout.items() if isinstance(v, float))
        dup = f"   (ties: {', '.join(f'#{d}' for d in m.duplicates)})" if m.duplicates else ""
        lines.append(f"  #{m.id}: {objs}" + (f"   held-out: {hold}" if hold else "") + dup)
    return lines


def _identity_text(ident: dict) -> str:
    extra = {k: v for k, v in ident.items() if k not in ("task", "split", "n", "metrics") and v not in (None, [], {})}
    return (f"{ident.get('task')} [split {ident.get('split')}, n={ident.get('n')}]"
            + ("".join(f", {k}={v}" for k, v in extra.items()) if extra else ""))


def candidate_lines(detail: dict, holdout_identity: list | None = None) -> list[str]:
    """`evomerge inspect DIR ID`: a candidate's status, scores with what measured them, timings, error, recipe."""
    import time

    import yaml

    d = detail
    lines = [f"candidate #{d['id']} (generation {d['generation']}, slot {d['slot']}): {d['status']}, "
             f"{d['attempts']} attempt(s)"]
    if d.get("objectives"):
        lines.append("  objectives: " + ", ".join(f"{k}={v:.6g}" for k, v in d["objectives"].items()))
    for title, scores, identities in (("fitness metrics", d.get("metrics"), d.get("identity")),
                                      ("held-out", d.get("holdout"), holdout_identity)):
        if not scores:
            continue
        lines.append(f"  {title}:")
        by_metric = {m: ident for ident in (identities or []) for m in ident.get("metrics", [])}
        for k, v in scores.items():
            value = f"{v:.6g}" if isinstance(v, (int, float)) else str(v)
            lines.append(f"    {k} = {value}" + (f"   ({_identity_text(by_metric[k])})" if k in by_metric else ""))
    timing = [f"{k} {d[k + '_s']:.3f} s" for k in ("materialize", "eval") if d.get(k + "_s") is not None]
    if d.get("examples") is not None:
        timing.append(f"{d['examples']} examples")
    if d.get("finished"):
        timing.append("finished " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["finished"])))
    if timing:
        lines.append("  timings: " + ", ".join(timing))
    if d.get("incumbent") is not None:
        lines.append(f"  racing incumbent: {d['incumbent']:.6g}")
    if d.get("error"):
        lines.append(f"  error ({d.get('error_kind') or 'candidate'}): {d['error']}")
    if d.get("last_error"):
        lines.append(f"  last infrastructure error: {d['last_error']}")
    lines.append(f"  genome: {len(d['genome'])} coordinate(s)")
    lines.append("  recipe:")
    lines += ["    " + ln for ln in yaml.safe_dump(d["recipe"], sort_keys=False).rstrip().splitlines()]
    return lines
