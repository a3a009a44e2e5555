"""The campaign loop: ask -> decode -> evaluate -> journal -> tell, resumable at any point.

Generation g asks the optimizer for a population, journals each genome as a pending candidate,
evaluates the ones without a result, commits every result as it arrives, and only then tells the
optimizer. Resume replays the same loop: the optimizer is deterministic given its seed and the
journaled results, so it asks the same genomes again; those already in the journal are reused
(never evaluated twice), and each generation's optimizer checkpoint digest must match the one
stored, or the resume stops with an error instead of silently diverging.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from evomerge import archive
from evomerge.config import Campaign, config_diff, load_campaign, parse_campaign
from evomerge.errors import EvomergeError
from evomerge.executors import Executor, LocalExecutor, Worker
from evomerge.journal import Journal
from evomerge.optimizers import make_optimizer
from evomerge.recipe import Recipe
from search_spaces.ps import ParameterSpace

PENALTY = 1e9  # loss told to the optimizer for a candidate that failed


def resolve_ref(ref: str) -> str:
    """`builtin:demo/<name>` -> the locally built demo family (built on first use); paths as they are."""
    if ref.startswith("builtin:"):
        from evomerge.demo import builtin_model

        return str(builtin_model(ref.split(":", 1)[1]))
    return ref


@dataclass
class Outcome:
    evaluated: int
    front: list[dict]
    folder: Path


class CampaignRunner:
    def __init__(self, campaign: Campaign, folder: str | Path, executor: Executor | None = None, progress: bool = True):
        self.c = campaign
        self.folder = Path(folder)
        self.journal = Journal(self.folder)
        self._check_config()
        self.base = resolve_ref(campaign.base) if campaign.base else None
        self.sources = {name: resolve_ref(ref) for name, ref in campaign.sources.items()}
        self.space = ParameterSpace.from_config(campaign.search_space, self.sources, self.base, campaign.seed, campaign.dtype)
        self.optimizer = make_optimizer(campaign.optimizer, self.space.dim, len(campaign.objectives), campaign.seed,
                                        self.space.x0, self.space.sigma0, campaign.budget)
        self.population = self.optimizer.population
        self.generations = math.ceil(campaign.budget / self.population)
        self._executor = executor
        self.progress = progress

    def _check_config(self) -> None:
        stored = self.journal.get("config")
        if stored is None:
            self.journal.set("config", self.c.raw)
            self.journal.set("created", time.time())
            return
        changes = config_diff(stored, self.c.raw)
        if changes:
            raise EvomergeError(
                f"{self.folder} holds a campaign with a different config ({'; '.join(changes)}); "
                "resume it unchanged with `evomerge resume DIR`, or start the new config in a new --out folder"
            )

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            from evomerge.racing import RacingRule

            rule = RacingRule(**self.c.racing) if self.c.racing else None
            worker = Worker(list(self.sources.values()), self.base, self.c.fitness, self.c.holdout,
                            self.c.dtype, self.c.executor.get("device", "cpu"), rule, self.c.objectives[0].metrics,
                            self.c.search_space.get("component"))
            if rule is not None:
                unbounded = [ev.identity()["task"] for ev in worker.evaluators["fitness"] if not getattr(ev, "bounded", False)]
                if unbounded:
                    raise EvomergeError(f"config field 'racing': fitness task(s) {unbounded} give no per-example scores "
                                        "in [0, 1]; racing needs exact-match style tasks (e.g. synthetic:<task>)")
            self._executor = LocalExecutor(worker)
        return self._executor

    def objectives_of(self, metrics: dict) -> dict[str, float]:
        missing = self.c.metric_names - set(metrics)
        if missing:
            raise EvomergeError(f"objective metric(s) {sorted(missing)} not produced by the fitness evaluators "
                                f"(they produce {sorted(metrics)}); fix 'objectives' or 'fitness' in the config")
        return {o.name: o.value(metrics) for o in self.c.objectives}

    def losses(self, objectives: dict | None) -> list[float]:
        if objectives is None:
            return [PENALTY] * len(self.c.objectives)
        return [-objectives[o.name] if o.direction == "maximize" else objectives[o.name] for o in self.c.objectives]

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> Outcome:
        bar = self._bar()
        try:
            for g in range(self.generations):
                genomes = self.optimizer.ask()
                rows = self.journal.generation(g)
                todo: dict[int, int] = {}
                values: dict[int, dict | None] = {}
                for slot, x in enumerate(genomes):
                    genome = [float(v) for v in x]
                    row = rows.get(slot)
                    if row is not None:
                        if row.genome != genome:
                            raise EvomergeError(
                                f"journal diverged at generation {g}, slot {slot}: the optimizer now asks a different "
                                "genome than the journal holds (was the code or library version changed?)"
                            )
                        if row.status in ("done", "raced", "failed"):
                            values[slot] = row.objectives
                            continue
                        cid = row.id
                    else:
                        cid = self.journal.add_pending(g, slot, genome, self.space.decode(x).to_dict())
                    todo[cid] = slot
                incumbent = self.incumbent()
                for cid, slot in todo.items():
                    self.journal.mark_started(cid)
                    self.executor.submit(cid, self.space.decode(genomes[slot]), "fitness", incumbent)
                for res in (self.executor.collect() if todo else ()):
                    slot = todo[res.cid]
                    objectives = self.objectives_of(res.metrics) if res.error is None else None
                    self.journal.record_result(res.cid, res.metrics, res.identity, objectives, res.error,
                                               res.materialize_s, res.eval_s, res.examples, res.raced)
                    values[slot] = objectives
                    if bar is not None:
                        bar.update(1)
                        if objectives is not None and not res.raced:
                            self._postfix(bar, objectives)
                self.optimizer.tell(genomes, [self.losses(values[s]) for s in range(len(genomes))])
                self._checkpoint(g)
            self._evaluate_holdout()
            self.journal.set("done", True)
        finally:
            if bar is not None:
                bar.close()
        return Outcome(self.journal.count("done", "raced", "failed"), self.front(), self.folder)

    def incumbent(self) -> float | None:
        """The best fully evaluated objective so far (what racing must plausibly beat)."""
        if not self.c.racing:
            return None
        done = [r.objectives[self.c.objectives[0].name] for r in self.journal.candidates("done")]
        return max(done) if done else None

    def _checkpoint(self, g: int) -> None:
        cp = self.optimizer.checkpoint()
        stored = self.journal.checkpoint(g)
        if stored is not None:
            if stored["digest"] != cp["digest"]:
                raise EvomergeError(f"resume diverged: the optimizer state after generation {g} differs from the "
                                    "journal's checkpoint; the journal was written by a different version or config")
            return
        done = [r.objectives for r in self.journal.candidates("done")]
        hv = archive.hypervolume(self.c.objectives, done) if done else 0.0
        self.journal.add_checkpoint(g, len(done), cp, hv)

    def _evaluate_holdout(self) -> None:
        if not self.c.holdout:
            return
        for row in self.front_rows():
            if row.holdout is None:
                self.journal.mark_started(row.id)
                self.executor.submit(row.id, Recipe.from_dict(row.recipe), "holdout")
        for res in self.executor.collect():
            if res.error:
                self.journal.record_holdout(res.cid, {"error": res.error})
                continue
            hold = dict(res.metrics)
            if self.c.metric_names <= set(hold):  # held-out sets that cover every objective score them too
                hold.update({o.name: o.value(hold) for o in self.c.objectives})
            self.journal.record_holdout(res.cid, hold)

    # -- reporting ----------------------------------------------------------------------------

    def front_rows(self):
        return front_rows(self.journal, self.c)

    def front(self) -> list[dict]:
        return front_members(self.journal, self.c)

    def _bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm

        done = self.journal.count("done", "raced", "failed")
        total = self.generations * self.population
        bar = tqdm(total=total, initial=min(done, total), desc=f"{self.c.name}", unit="cand", dynamic_ncols=True, mininterval=0.5)
        self._postfix(bar)
        return bar

    def _postfix(self, bar, objectives: dict | None = None) -> None:
        """Best-so-far per objective on the bar; kept in memory, not re-read from the journal."""
        if objectives is None:  # start: seed from what the journal already holds
            self._best: dict[str, float] = {}
            for r in self.journal.candidates("done"):
                self._postfix_update(r.objectives)
        else:
            self._postfix_update(objectives)
        if self._best:
            bar.set_postfix(best={k: f"{v:.4g}" for k, v in self._best.items()}, refresh=False)

    def _postfix_update(self, objectives: dict) -> None:
        for o in self.c.objectives:
            v = objectives[o.name]
            old = self._best.get(o.name)
            if old is None or (v > old if o.direction == "maximize" else v < old):
                self._best[o.name] = v


def front_rows(journal: Journal, campaign: Campaign):
    rows = journal.candidates("done")
    idx = archive.front_indices(campaign.objectives, [r.objectives for r in rows])
    return [rows[i] for i in idx]


def front_members(journal: Journal, campaign: Campaign) -> list[dict]:
    out = []
    for r in front_rows(journal, campaign):
        out.append({"id": r.id, "generation": r.generation, "objectives": r.objectives, "metrics": r.metrics,
                    "holdout": {k: v for k, v in (r.holdout or {}).items()}, "genome": r.genome, "recipe": r.recipe})
    return out


def open_campaign(folder: str | Path) -> tuple[Journal, Campaign]:
    """The journal of an existing campaign folder and the config it was started with."""
    folder = Path(folder)
    if not Journal.exists(folder):  # checked first: opening a Journal would create the folder
        raise EvomergeError(f"{folder} holds no campaign journal (journal.sqlite); "
                            f"start one with `evomerge run CONFIG --out {folder}`")
    journal = Journal(folder)
    return journal, parse_campaign(journal.get("config"), f"{folder}/journal")


def campaign_status(folder: str | Path) -> dict:
    journal, campaign = open_campaign(folder)
    rows = journal.candidates()
    done_rows = [r for r in rows if r.status == "done"]
    best = {}
    for o in campaign.objectives:
        vals = [r.objectives[o.name] for r in done_rows]
        if vals:
            best[o.name] = max(vals) if o.direction == "maximize" else min(vals)
    cps = journal.checkpoints()
    status = {
        "name": campaign.name,
        "evaluated": sum(r.status in ("done", "raced", "failed") for r in rows),
        "failed": sum(r.status == "failed" for r in rows),
        "raced": sum(r.status == "raced" for r in rows),
        "examples_scored": journal.examples_scored(),
        "pending": sum(r.status == "pending" for r in rows),
        "budget": campaign.budget,
        "generations": len(cps),
        "done": bool(journal.get("done", False)),
        "best": best,
        "front_size": len(front_rows(journal, campaign)),
        "hypervolume": [c["hypervolume"] for c in cps],
        "eval_seconds": round(sum((r.eval_s or 0) + (r.materialize_s or 0) for r in rows), 2),
    }
    journal.close()
    return status


def run_campaign(config_path: str | Path, out: str | Path, progress: bool = True) -> Outcome:
    return CampaignRunner(load_campaign(config_path), out, progress=progress).run()


def resume_campaign(folder: str | Path, progress: bool = True) -> Outcome:
    journal, campaign = open_campaign(folder)
    journal.close()
    return CampaignRunner(campaign, folder, progress=progress).run()

