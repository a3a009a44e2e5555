"""The campaign loop: ask -> decode -> evaluate -> journal -> tell, resumable at any point.

Start-up, in order, so that a mistake costs nothing and leaves nothing behind:
1. pre-flight (`evomerge.preflight`): models from their headers, the search space, the optimizer,
   the evaluators, the memory estimate — no tensor read, nothing written — and the executor's
   own checks (`prepare`: a Ray cluster reached and able to hold a worker);
2. the campaign lock (one runner per folder), then the journal: a new folder stores the config
   and the models' provenance only now; an existing one must hold the same config and models.

Generation g asks the optimizer for a population and keeps the first `size(g)` genomes (the last
generation is partial when the budget is not a multiple of the population: exactly `budget`
candidates are evaluated). Each is journaled as pending with racing's incumbent for the
generation (the best full objective of earlier generations only), evaluated, and committed as
it arrives; only then is the optimizer told. Resume replays the same loop: the optimizer is
deterministic given its seed and the journaled results, so it asks the same genomes again;
those already in the journal are reused (never evaluated twice), and each generation's genomes,
incumbents and optimizer checkpoint digest must match the journal, or resume stops instead of
silently diverging. That is the barrier (`barrier: true`, the default); without it
(`barrier: false`) genomes are asked one at a time as workers free up and results told as they
arrive, and resume replays the journaled interleaving of asks and tells (`_run_async`).

Failures: a candidate that fails on its own (NaN scores, an evaluator's CandidateError) is
journaled as failed and told as a penalty. An infrastructure failure (out of memory, a lost
worker) is never told: the candidate is retried `executor.retries` times, then the campaign
stops with the error and `evomerge resume` picks it up again.
"""

from __future__ import annotations

import math
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from evomerge import archive
from evomerge.config import Campaign, config_diff, load_campaign, parse_campaign, with_executor
from evomerge.errors import EvomergeError, one_line
from evomerge.executors import Executor, executor_kind
from evomerge.journal import Journal
from evomerge.lock import CampaignLock
from evomerge.preflight import Plan, check_provenance, preflight
from evomerge.view import Member, front_members, open_campaign
from evomerge.worker import FITNESS, HOLDOUT, Result, Task

PENALTY = 1e9  # loss told to the optimizer for a candidate that failed on its own


@dataclass
class Outcome:
    evaluated: int
    front: list[Member]
    folder: Path


class CampaignRunner:
    def __init__(self, campaign: Campaign, folder: str | Path, executor: Executor | None = None, progress: bool = True,
                 plan: Plan | None = None):
        self.campaign = campaign
        self.folder = Path(folder)
        self.progress = progress
        # Relative model paths mean what they meant where the campaign started, wherever it resumes.
        self.root = stored_root(self.folder) or Path.cwd()
        self.plan = plan or preflight(campaign, root=self.root)
        self.space = self.plan.space
        self.optimizer = self.plan.optimizer
        self.population = self.optimizer.population
        self.sizes = self.plan.generation_sizes
        self.sources, self.base = self.plan.sources, self.plan.base
        self._executor = executor
        # Reach the workers' world (a Ray cluster) before anything is written: a wrong address costs nothing.
        self.session = executor_kind(campaign.executor["kind"]).prepare(campaign.executor) if executor is None else {}
        # startup: workers starting; waiting: for results; the rest of wall is the engine's own time
        self.timing = {"startup_s": 0.0, "wall_s": 0.0, "waiting_s": 0.0}
        self.lock = CampaignLock(self._make_folder()).acquire()
        try:
            self.journal = Journal(self.folder)
            self._check_journal()
        except BaseException:
            self.lock.release()
            raise

    def _make_folder(self) -> Path:
        if self.folder.exists() and not self.folder.is_dir():
            raise EvomergeError(f"--out {self.folder} is a file; pass a folder for the campaign")
        if (self.folder / "hybrid.json").is_file():
            raise EvomergeError(f"{self.folder} holds a staged campaign; start this config in a new --out folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EvomergeError(f"cannot create campaign folder {self.folder} ({exc.strerror}); "
                                "pick an --out folder you can write to") from None
        return self.folder

    def _check_journal(self) -> None:
        """A new folder takes the config and provenance now (pre-flight passed); an old one must match."""
        stored = self.journal.get("config")
        if stored is not None:
            changes = config_diff(stored, self.campaign.raw)
            if changes and self.journal.count("done", "raced", "failed") == 0:
                # Nothing was evaluated (its start stopped on a mistake): the corrected config takes the folder.
                print(f"evomerge: note: {self.folder} held a campaign with no finished candidate; starting it over "
                      f"with the new config ({'; '.join(changes)})", file=sys.stderr)
                self.journal.reset()
                stored = None
            elif changes:
                raise EvomergeError(
                    f"{self.folder} holds a campaign with a different config ({'; '.join(changes)}); "
                    "resume it unchanged with `evomerge resume DIR`, or start the new config in a new --out folder"
                )
        if stored is None:
            with self.journal.transaction():  # all or nothing: a folder never holds half a start
                self.journal.set("provenance", self.plan.provenance)
                self.journal.set("root", str(self.root))
                self.journal.set("created", time.time())
                self.journal.set("config", self.campaign.raw)
            return
        for note in check_provenance(self.journal.get("provenance"), self.plan.provenance):
            print(f"evomerge: note: {note}", file=sys.stderr)

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            kind = executor_kind(self.campaign.executor["kind"])
            try:
                self._executor = kind.create(self.campaign.executor, self.plan.worker,
                                             {"evaluators": self.plan.evaluators, "tokenizer": self.plan.tokenizer,
                                              "root": str(self.root), "session": self.session})
            except EvomergeError:
                raise
            except Exception as exc:  # out of memory loading the bank, a transformers error building the model
                raise EvomergeError(f"could not start the {kind.kind} worker ({one_line(exc)}); fix the cause and "
                                    f"continue with `evomerge resume {self.folder}`") from None
        return self._executor

    def objectives_of(self, metrics: dict) -> dict[str, float]:
        missing = self.campaign.metric_names - set(metrics)
        if missing:
            raise EvomergeError(f"config field 'objectives': metric(s) {sorted(missing)} are not produced by the "
                                f"fitness evaluators (they produce {sorted(metrics)}); fix 'objectives' or 'fitness' "
                                "and run again (a campaign with no finished candidate takes a corrected config)")
        return {o.name: o.value(metrics) for o in self.campaign.objectives}

    def losses(self, objectives: dict | None) -> list[float]:
        if objectives is None:
            return [PENALTY] * len(self.campaign.objectives)
        return [-objectives[o.name] if o.direction == "maximize" else objectives[o.name]
                for o in self.campaign.objectives]

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> Outcome:
        bar = self._bar()
        started = time.perf_counter()
        session = {"started": time.time(), "executor": self.campaign.executor["kind"]}
        try:
            if self.journal.count("pending") or self.journal.count("done", "raced", "failed") < self.campaign.budget:
                self.executor  # start the workers now: their start-up is not the engine's per-candidate time
            self.timing["startup_s"] = time.perf_counter() - started
            started = time.perf_counter()
            if self.campaign.barrier:
                self._run_generations(bar)
            else:
                self._run_async(bar)
            self._evaluate_holdout()
            self.journal.set("done", True)
        except KeyboardInterrupt:
            n = self.journal.count("done", "raced", "failed")
            raise EvomergeError(f"interrupted; {n} of {self.campaign.budget} candidates are safe in "
                                f"{self.journal.path}; continue with `evomerge resume {self.folder}`") from None
        finally:
            self.timing["wall_s"] = time.perf_counter() - started
            self._journal_session(session)
            if bar is not None:
                bar.close()
            if self._executor is not None:
                self._executor.close()
            self.lock.release()
        return Outcome(self.journal.count("done", "raced", "failed"), front_members(self.journal, self.campaign),
                       self.folder)

    def _run_generations(self, bar) -> None:
        """With the barrier: a generation is asked whole and told whole, in ask order, whatever order its
        results arrived in — so the campaign is the same on one worker or many."""
        for g, size in enumerate(self.sizes):
            genomes = [[float(v) for v in x] for x in self.optimizer.ask()[:size]]
            values = self._generation(g, genomes, bar)
            self.optimizer.tell(genomes, [self.losses(values[s]) for s in range(size)])
            self._checkpoint(g, [r for r in self.journal.candidates("done") if r.generation <= g])

    def _generation(self, g: int, genomes: list[list[float]], bar) -> dict[int, dict | None]:
        """Evaluate what the journal does not hold yet; return each slot's objectives (None: failed)."""
        rows = self.journal.generation(g)
        incumbent = self.incumbent(g)
        values: dict[int, dict | None] = {}
        todo: list[Task] = []
        slot_of: dict[int, int] = {}
        for slot, genome in enumerate(genomes):
            row = rows.get(slot)
            if row is not None:
                if row.genome != genome:
                    raise EvomergeError(
                        f"journal diverged at generation {g}, slot {slot}: the optimizer now asks a different "
                        "genome than the journal holds (was the code or library version changed?)")
                if self.campaign.racing and row.incumbent != incumbent:
                    raise EvomergeError(
                        f"journal diverged at generation {g}, slot {slot}: racing's incumbent was {row.incumbent}, "
                        f"now {incumbent}; the journal was written by a different version")
                if row.status in ("done", "raced", "failed"):
                    values[slot] = row.objectives if row.status != "failed" else None
                    continue
                cid, recipe = row.id, row.recipe
            else:
                recipe = self.space.decode(genome).to_dict()
                cid = self.journal.add_pending(g, slot, genome, recipe, incumbent)
            todo.append(Task(cid, recipe, FITNESS, incumbent))
            slot_of[cid] = slot
        for res in self._run_tasks(todo):
            slot = slot_of[res.cid]
            values[slot] = self._record(res)
            self._progress(bar, res, values[slot])
        return values

    def _run_async(self, bar) -> None:
        """No barrier: a genome is asked whenever a worker is free and each result is told as it arrives.

        Resume replays the journal's order of events: before candidate k was asked, `asked_after`
        results had been told, and each result's `told` is its place in that order; replaying asks
        and tells in that interleaving rebuilds the optimizer exactly (checked genome by genome and
        by the checkpoint digests every `population` tells). Candidates asked but unfinished are
        evaluated again. Nominal generations (ask index // population) index the journal and `status`.
        """
        pop, budget = self.population, self.campaign.budget
        rows = self.journal.candidates()
        told = sorted((r for r in rows if r.told is not None), key=lambda r: r.told)
        self._told, self._best_full = 0, None
        for row in rows:
            while self._told < (row.asked_after or 0):
                self._tell_row(told[self._told])
            genome, incumbent = self.optimizer.ask_one(), self._best_full
            if row.asked_after is None or genome != row.genome or (self.campaign.racing and row.incumbent != incumbent):
                raise EvomergeError(f"journal diverged at candidate #{row.id}: the optimizer now asks a different "
                                    "genome (or racing bar) than the journal holds; the journal was written by a "
                                    "different version")
        while self._told < len(told):
            self._tell_row(told[self._told])

        tasks = {r.id: Task(r.id, r.recipe, FITNESS, r.incumbent) for r in rows if r.status == "pending"}
        genome_of = {r.id: r.genome for r in rows}
        for task in tasks.values():
            self._submit(task)
        failures: dict[int, int] = {}
        asked = len(rows)
        while asked < budget or self.executor.outstanding():
            while asked < budget and self.executor.outstanding() < self.executor.slots:
                genome = self.optimizer.ask_one()
                recipe = self.space.decode(genome).to_dict()
                cid = self.journal.add_pending(asked // pop, asked % pop, genome, recipe, self._best_full,
                                               asked_after=self._told)
                tasks[cid], genome_of[cid] = Task(cid, recipe, FITNESS, self._best_full), genome
                self._submit(tasks[cid])
                asked += 1
            res = self._next_result(tasks, failures)
            objectives = self._record(res, told=self._told)
            self._tell(genome_of[res.cid], objectives, raced=res.raced)
            self._progress(bar, res, objectives)

    def _tell_row(self, row) -> None:
        self._tell(row.genome, row.objectives if row.status != "failed" else None, raced=row.status == "raced")

    def _tell(self, genome: list[float], objectives: dict | None, raced: bool) -> None:
        """Tell one result (asynchronous mode), keep racing's bar, checkpoint every `population` tells."""
        self.optimizer.tell_one(genome, self.losses(objectives))
        first = self.campaign.objectives[0]
        if objectives is not None and not raced and \
                (self._best_full is None or first.better(objectives[first.name], self._best_full)):
            self._best_full = objectives[first.name]
        self._told += 1
        if self._told % self.population == 0:
            told = self._told
            self._checkpoint(told // self.population - 1,
                             [r for r in self.journal.candidates("done") if r.told is not None and r.told < told])

    def _progress(self, bar, res: Result, objectives: dict | None) -> None:
        if bar is not None:
            bar.update(1)
            if objectives is not None and not res.raced:
                self._postfix(bar, objectives)

    def _submit(self, task: Task) -> None:
        if task.role == FITNESS:  # attempts count fitness evaluations (held-out scoring is not a retry)
            self.journal.mark_started(task.cid)
        self.executor.submit(task)

    def _next_result(self, tasks: dict[int, Task], failures: dict[int, int]) -> Result:
        """The next result that is not an infrastructure failure: those are resubmitted, or stop the campaign."""
        retries = int(self.campaign.executor.get("retries", 2))
        while True:
            waited = time.perf_counter()
            res = self.executor.next_result()
            self.timing["waiting_s"] += time.perf_counter() - waited
            if res.error_kind != "infrastructure":
                return res
            self.journal.record_infrastructure_error(res.cid, res.error)
            failures[res.cid] = failures.get(res.cid, 0) + 1
            if not res.retryable or failures[res.cid] > retries:
                raise EvomergeError(
                    f"candidate #{res.cid} failed for a reason not its own ({res.error}) "
                    f"{failures[res.cid]} time(s); nothing about it was told to the optimizer. Fix the "
                    f"cause, then continue with `evomerge resume {self.folder}`")
            self._submit(tasks[res.cid])

    def _run_tasks(self, tasks: list[Task]):
        """Submit tasks and yield their results as they finish; infrastructure failures are retried."""
        by_id = {t.cid: t for t in tasks}
        failures: dict[int, int] = {}
        for task in tasks:
            self._submit(task)
        for _ in tasks:
            yield self._next_result(by_id, failures)

    def _record(self, res: Result, told: int | None = None) -> dict | None:
        """Journal one fitness result; the objectives told to the optimizer (None: failed on its own)."""
        if res.error_kind == "candidate":
            self.journal.record_result(res.cid, None, None, None, res.error, res.materialize_s, res.eval_s,
                                       told=told)
            return None
        try:
            objectives = self.objectives_of(res.metrics)
        except EvomergeError as exc:  # a config error: the candidate stays pending, the campaign stops
            self.journal.record_infrastructure_error(res.cid, str(exc))
            raise
        bad = {k: v for k, v in objectives.items() if not math.isfinite(v)}
        if bad:
            self.journal.record_result(res.cid, res.metrics, res.identity, None,
                                       f"non-finite objective(s) {bad}", res.materialize_s, res.eval_s, res.examples,
                                       told=told)
            return None
        self.journal.record_result(res.cid, res.metrics, res.identity, objectives, None, res.materialize_s,
                                   res.eval_s, res.examples, res.raced, told)
        return objectives

    def incumbent(self, g: int) -> float | None:
        """Racing's bar for generation g: the best full objective of generations before g.

        Fixed per generation (not updated as g's own results arrive), so an interrupted and an
        uninterrupted run race every candidate against the same value; it is journaled with each
        candidate and checked on resume.
        """
        if not self.campaign.racing:
            return None
        name = self.campaign.objectives[0].name
        done = [r.objectives[name] for r in self.journal.candidates("done") if r.generation < g]
        return max(done) if done else None

    def _checkpoint(self, g: int, done: list) -> None:
        """Checkpoint `g` (after generation g, or after (g + 1) * population tells), or check it on resume."""
        cp = self.optimizer.checkpoint()
        stored = self.journal.checkpoint(g)
        if stored is not None:
            if stored["digest"] != cp["digest"]:
                raise EvomergeError(f"resume diverged: the optimizer state after generation {g} differs from the "
                                    "journal's checkpoint; the journal was written by a different version or config")
            return
        reference = self.hv_reference(done)
        hv = archive.hypervolume(self.campaign.objectives, [r.objectives for r in done], reference) if reference else 0.0
        self.journal.add_checkpoint(g, len(done), cp, hv)

    def hv_reference(self, done: list) -> dict | None:
        """The campaign's hypervolume reference: journaled once, from the config or the first generation with results."""
        stored = self.journal.get("hv_reference")
        if stored is not None:
            return stored
        objectives = self.campaign.objectives
        if not done and any(o.reference is None for o in objectives):
            return None
        first = min((r.generation for r in done), default=0)
        reference = archive.reference_point(objectives, [r.objectives for r in done if r.generation == first])
        self.journal.set("hv_reference", reference)
        return reference

    def _evaluate_holdout(self) -> None:
        """Score up to `holdout_max` front points, spread over the front, on the held-out evaluators, and the
        space's baselines (each source alone, their uniform average, the base): a winner means something
        only beside what it was merged from, and the card and the report print that table."""
        if not self.campaign.holdout:
            return
        front = front_members(self.journal, self.campaign)
        chosen = [front[i] for i in archive.spread(self.campaign.objectives, [m.objectives for m in front],
                                                   self.campaign.holdout_max)]
        tasks = [Task(m.id, m.recipe, HOLDOUT) for m in chosen if not m.holdout]
        baselines = self.journal.get("baselines") or {}
        todo = {name: recipe for name, recipe in self.space.baselines().items() if name not in baselines}
        names = {-1 - i: name for i, name in enumerate(todo)}  # negative ids: never a journal row
        tasks += [Task(cid, todo[name], HOLDOUT) for cid, name in names.items()]
        for res in self._run_tasks(tasks):
            hold = self._holdout_scores(res)
            if res.identity and self.journal.get("holdout_identity") is None:
                self.journal.set("holdout_identity", res.identity)
            if res.cid < 0:
                baselines[names[res.cid]] = hold
                self.journal.set("baselines", baselines)
            else:
                self.journal.record_holdout(res.cid, hold)

    def _holdout_scores(self, res: Result) -> dict:
        if res.error_kind == "candidate":
            return {"error": res.error}
        hold = dict(res.metrics)
        if self.campaign.metric_names <= set(hold):  # held-out sets that cover every objective score them too
            hold.update({o.name: o.value(hold) for o in self.campaign.objectives})
        if not archive.finite(hold):
            hold = {"error": f"non-finite held-out scores {hold}"}
        return hold

    def _journal_session(self, session: dict) -> None:
        """One entry per run or resume (start-up, wall, waiting, executor): the report's timings."""
        session.update({k: round(v, 3) for k, v in self.timing.items()},
                       evaluated=self.journal.count("done", "raced", "failed"))
        try:
            self.journal.set("sessions", [*(self.journal.get("sessions") or []), session])
        except sqlite3.Error:  # the journal itself failing: the error on its way out says so
            pass

    # -- progress -----------------------------------------------------------------------------

    def _bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm

        done = self.journal.count("done", "raced", "failed")
        bar = tqdm(total=self.campaign.budget, initial=min(done, self.campaign.budget), desc=self.campaign.name,
                   unit="cand", dynamic_ncols=True, mininterval=0.5)
        self._best: dict[str, float] = {}
        for r in self.journal.candidates("done"):
            self._postfix(bar, r.objectives)
        return bar

    def _postfix(self, bar, objectives: dict) -> None:
        """Best-so-far per objective on the bar; kept in memory, not re-read from the journal."""
        for o in self.campaign.objectives:
            v = objectives[o.name]
            if o.name not in self._best or o.better(v, self._best[o.name]):
                self._best[o.name] = v
        bar.set_postfix(best={k: f"{v:.4g}" for k, v in self._best.items()}, refresh=False)


def stored_root(folder: Path) -> Path | None:
    """The directory a campaign started in (relative model paths resolve there), if it has a journal."""
    if not Journal.exists(folder):
        return None
    journal = Journal(folder, create=False)
    try:
        root = journal.get("root")
    finally:
        journal.close()
    return Path(root) if isinstance(root, str) else None


def run_campaign(config_path: str | Path, out: str | Path, progress: bool = True) -> Outcome:
    return CampaignRunner(load_campaign(config_path), out, progress=progress).run()


def resume_campaign(folder: str | Path, progress: bool = True, executor: dict | None = None) -> Outcome:
    """Continue a campaign; `executor` overrides where its candidates run (a campaign may change executors)."""
    journal, campaign = open_campaign(folder)
    journal.close()
    if executor:
        campaign = parse_campaign(with_executor(campaign.raw, executor), f"{folder}/journal.sqlite")
    return CampaignRunner(campaign, folder, progress=progress).run()
