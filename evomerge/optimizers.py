"""One ask/tell interface over CMA-ES (`cma`), nevergrad's optimizers and NSGA-II (pymoo).

Every optimizer works in the unit box and minimizes; the campaign negates maximized objectives.
Each one is deterministic given its seed: the libraries draw from NumPy's (and Python's) global
random state, so every call runs inside the optimizer's own saved copy of that state and puts
the caller's back afterwards. That determinism is what makes resume exact: a resumed campaign
rebuilds the optimizer by replaying the journaled asks and tells, and checks the result against
the checkpoint digest the journal stored for each generation. Nothing is unpickled.

The last generation of a campaign whose budget is not a multiple of the population is partial:
the optimizer asks a full population, only the first `budget - evaluated` are evaluated, and
`tell` receives just those. nevergrad is told each of them (it takes any number); NSGA-II is
told them as a smaller offspring set (pymoo's survival accepts one); CMA-ES is not told (pycma's
update assumes a full population and refuses fewer than 3) — the campaign ends after that
generation, so nothing would be asked from the updated state anyway.

Without a generation barrier (`barrier: false`, for executors with several workers) the campaign
asks one genome whenever a worker is free and tells each result as it arrives: `ask_one` and
`tell_one`. nevergrad does that natively. CMA-ES and NSGA-II are generational, so they ask a
population ahead and hand it out one genome at a time; when a generation's tail is still running
and a worker is free, they sample more genomes from the current (not yet updated) state; results
are buffered in the order they arrive, and every `population` of them is one update, whichever
sample they came from — the asynchronous ES of the literature (pycma accepts solutions from an
earlier ask; pymoo's survival merges any offspring). After an update the unused samples of the
old state are dropped. With one worker this is exactly the generational loop.

Optimizers register by name (`cma`, `nsga2`, `nevergrad:<Name>`): a new one is one class and one
`register_optimizer` call.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from contextlib import contextmanager

from typing import Callable

import numpy as np

from evomerge.errors import EvomergeError, close_match


def default_population(dim: int) -> int:
    """CMA-ES's default, 4 + floor(3 ln n), used for every optimizer unless set."""
    return 4 + int(math.floor(3 * math.log(max(dim, 1))))


def _digest(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def _round(a) -> list:
    return [float(f"{v:.12g}") for v in np.asarray(a, dtype=float).ravel()]


class Optimizer:
    """ask() -> genomes (population-sized list); tell(genomes, losses) with losses (pop, n_obj)."""

    population: int
    n_obj: int = 1

    def __init__(self, seed: int):
        saved = np.random.get_state(), random.getstate()
        np.random.seed(seed % (2**32))
        random.seed(seed)
        self._rng = np.random.get_state(), random.getstate()
        np.random.set_state(saved[0])
        random.setstate(saved[1])
        self._ahead: list[list[float]] = []  # asked ahead, not handed out yet
        self._arrived: list[tuple] = []  # results not yet told (fewer than a population)
        self._sent: list[tuple] = []  # (genome, the library's object for it), for every genome handed out

    def _take(self, genome: list[float]):
        """The library's object for a genome handed out earlier (a list: two samples clipped to one corner can tie)."""
        for i, (g, obj) in enumerate(self._sent):
            if g == genome:
                del self._sent[i]
                return obj
        raise EvomergeError("the optimizer was told a genome it never asked (the journal and the optimizer disagree)")

    @contextmanager
    def _own_rng(self):
        saved = np.random.get_state(), random.getstate()
        np.random.set_state(self._rng[0])
        random.setstate(self._rng[1])
        try:
            yield
        finally:
            self._rng = np.random.get_state(), random.getstate()
            np.random.set_state(saved[0])
            random.setstate(saved[1])

    def ask(self) -> list[np.ndarray]:
        with self._own_rng():
            return [np.clip(np.asarray(x, dtype=float), 0.0, 1.0) for x in self._ask()]

    # -- asynchronous use: one genome at a time, results told as they arrive --------------------

    def ask_one(self) -> list[float]:
        if not self._ahead:
            self._ahead = [[float(v) for v in x] for x in self.ask()]
            self._remember(self._ahead)
        return self._ahead.pop(0)

    def tell_one(self, genome: list[float], loss: list[float]) -> None:
        """Buffer one result; every `population` results are one update of the state."""
        self._arrived.append((genome, loss))
        if len(self._arrived) < self.population:
            return
        batch, self._arrived = self._arrived[: self.population], self._arrived[self.population:]
        with self._own_rng():
            self._tell_async([g for g, _ in batch], np.asarray([loss for _, loss in batch], dtype=float)
                             .reshape(len(batch), self.n_obj))
        self._ahead = []  # samples of the old state: the next ask samples the updated one

    def _remember(self, genomes: list[list[float]]) -> None:
        """Keep the library's own objects for asked genomes (its tell needs them, whichever ask made them)."""

    def _tell_async(self, genomes, losses) -> None:
        raise NotImplementedError

    def tell(self, genomes: list[np.ndarray], losses: list[list[float]]) -> None:
        """Tell the results of the asked genomes, in ask order; fewer than asked at a partial last generation."""
        with self._own_rng():
            self._tell(genomes, np.asarray(losses, dtype=float).reshape(len(genomes), self.n_obj))

    def checkpoint(self) -> dict:
        """A small JSON summary of the state, and its digest (compared on resume)."""
        state = self._state()
        return {"state": state, "digest": _digest(state)}

    def _ask(self):
        raise NotImplementedError

    def _tell(self, genomes, losses) -> None:
        raise NotImplementedError

    def _state(self) -> dict:
        raise NotImplementedError


class CMAES(Optimizer):
    """pycma. pycma cannot run a one-dimensional problem, so a 1-D genome is searched in 2-D with a
    second coordinate that nothing reads: the search over the real coordinate is unchanged in law."""

    def __init__(self, dim: int, seed: int, x0: np.ndarray, sigma0: float, population: int | None = None):
        super().__init__(seed)
        import cma

        self.population = population or default_population(dim)
        self.dim = dim
        x0 = list(x0) + ([0.5] if dim == 1 else [])
        opts = {"popsize": self.population, "bounds": [0.0, 1.0], "seed": seed + 1, "verbose": -9}
        with self._own_rng():
            self.es = cma.CMAEvolutionStrategy(x0, sigma0, opts)
        self._asked: list = []

    def _ask(self):
        self._asked = self.es.ask()
        return [x[: self.dim] for x in self._asked]

    def _tell(self, genomes, losses):
        if len(genomes) < self.population:
            return  # a partial last generation: see the module docstring
        self.es.tell(self._asked, [float(v) for v in losses[:, 0]])

    def _remember(self, genomes):
        self._sent += list(zip(genomes, self._asked))

    def _tell_async(self, genomes, losses):
        self.es.tell([self._take(g) for g in genomes], [float(v) for v in losses[:, 0]])

    def _state(self):
        return {"kind": "cma", "iteration": int(self.es.countiter), "mean": _round(self.es.mean),
                "sigma": float(f"{self.es.sigma:.12g}")}


class Nevergrad(Optimizer):
    def __init__(self, name: str, dim: int, seed: int, x0: np.ndarray, sigma0: float, budget: int,
                 population: int | None = None, n_obj: int = 1):
        super().__init__(seed)
        import nevergrad as ng

        if name not in ng.optimizers.registry:
            close = sorted(k for k in ng.optimizers.registry if k.lower().startswith(name[:3].lower()))[:8]
            raise EvomergeError(f"config field 'optimizer.name': bad value 'nevergrad:{name}'; nevergrad has no such "
                                f"optimizer (similar: {', '.join(close) or 'see nevergrad.optimizers.registry'})")
        self.population = population or default_population(dim)
        self.n_obj = n_obj
        param = ng.p.Array(init=np.asarray(x0, dtype=float)).set_bounds(0.0, 1.0).set_mutation(sigma=sigma0)
        param.random_state = np.random.RandomState(seed)
        self.opt = ng.optimizers.registry[name](parametrization=param, budget=budget, num_workers=self.population)
        self.name = name
        self._pending: list = []
        self._told = 0

    def _ask(self):
        self._pending = [self.opt.ask() for _ in range(self.population)]
        return [c.value for c in self._pending]

    def _tell(self, genomes, losses):
        for cand, loss in zip(self._pending[: len(genomes)], losses):
            self.opt.tell(cand, float(loss[0]) if self.n_obj == 1 else [float(v) for v in loss])
        self._told += len(self._pending)
        self._pending = []

    def ask_one(self) -> list[float]:
        with self._own_rng():
            cand = self.opt.ask()
        genome = [float(v) for v in np.clip(np.asarray(cand.value, dtype=float), 0.0, 1.0)]
        self._sent.append((genome, cand))
        return genome

    def tell_one(self, genome: list[float], loss: list[float]) -> None:
        """nevergrad takes results one at a time, in any order."""
        with self._own_rng():
            self.opt.tell(self._take(genome), float(loss[0]) if self.n_obj == 1 else [float(v) for v in loss])
        self._told += 1

    def _state(self):
        rec = self.opt.provide_recommendation().value if self._told else None
        return {"kind": f"nevergrad:{self.name}", "told": self._told,
                "recommendation": _round(rec) if rec is not None else None}


class NSGA2(Optimizer):
    def __init__(self, dim: int, n_obj: int, seed: int, population: int | None = None):
        super().__init__(seed)
        from pymoo.algorithms.moo.nsga2 import NSGA2 as PymooNSGA2
        from pymoo.core.problem import Problem

        self.population = population or default_population(dim)
        self.n_obj = n_obj
        self.problem = Problem(n_var=dim, n_obj=n_obj, xl=np.zeros(dim), xu=np.ones(dim))
        with self._own_rng():
            self.algo = PymooNSGA2(pop_size=self.population)
            self.algo.setup(self.problem, termination=("n_gen", 10**9), seed=seed, verbose=False)
        self._pop = None

    def _ask(self):
        self._pop = self.algo.ask()
        return list(self._pop.get("X"))

    def _tell(self, genomes, losses):
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        offspring = self._pop[: len(genomes)]
        Evaluator().eval(StaticProblem(self.problem, F=losses), offspring)
        self.algo.tell(infills=offspring)

    def _remember(self, genomes):
        self._sent += list(zip(genomes, self._pop))

    def _tell_async(self, genomes, losses):
        from pymoo.core.evaluator import Evaluator
        from pymoo.core.population import Population
        from pymoo.problems.static import StaticProblem

        offspring = Population.create(*[self._take(g) for g in genomes])
        Evaluator().eval(StaticProblem(self.problem, F=losses), offspring)
        self.algo.tell(infills=offspring)

    def _state(self):
        pop = self.algo.pop
        x = pop.get("X") if pop is not None else np.zeros(0)
        f = pop.get("F") if pop is not None else np.zeros(0)
        return {"kind": "nsga2", "generation": int(self.algo.n_gen or 0), "pop_x_sum": _round(np.sum(x, axis=0)),
                "pop_f_sum": _round(np.sum(f, axis=0)) if f is not None and len(f) else []}


Factory = Callable[[str, dict, int, int, int, np.ndarray, float, int], Optimizer]
OPTIMIZERS: dict[str, Factory] = {}


def register_optimizer(prefix: str, factory: Factory) -> None:
    """`prefix` is the part of `optimizer.name` before any ':' (nevergrad:<Name> -> nevergrad)."""
    OPTIMIZERS[prefix] = factory


def optimizer_names() -> list[str]:
    return list(OPTIMIZERS)


def _cma(name, spec, dim, n_obj, seed, x0, sigma0, budget):
    if n_obj != 1:
        raise EvomergeError("config field 'optimizer.name': cma optimizes one objective; use nsga2 for several")
    return CMAES(dim, seed, x0, sigma0, spec.get("population"))


register_optimizer("cma", _cma)
register_optimizer("nsga2", lambda name, spec, dim, n_obj, seed, x0, sigma0, budget: NSGA2(dim, n_obj, seed, spec.get("population")))
register_optimizer("nevergrad", lambda name, spec, dim, n_obj, seed, x0, sigma0, budget: Nevergrad(
    name.split(":", 1)[1], dim, seed, x0, sigma0, budget, spec.get("population"), n_obj))


def make_optimizer(spec: dict, dim: int, n_obj: int, seed: int, x0: np.ndarray, sigma0: float, budget: int) -> Optimizer:
    name = spec["name"]
    factory = OPTIMIZERS.get(name.split(":", 1)[0])
    if factory is None:
        raise EvomergeError(f"config field 'optimizer.name': bad value {name!r}; allowed: cma, nsga2, "
                            f"nevergrad:<Name>{close_match(name, OPTIMIZERS)}")
    return factory(name, spec, dim, n_obj, seed, x0, float(spec.get("sigma0", sigma0)), budget)
