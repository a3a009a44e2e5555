"""Racing: score a candidate on growing random subsets and stop it once it cannot plausibly beat the best.

The rule. The objective is a weighted sum (weights >= 0, maximized) of per-example scores in
[0, 1] (exact match, accuracy, ROUGE-L). Each fitness set is visited in one seeded random order
(the same for every candidate: `racing.seed`), so a stage is a random sample of the set, not its
first rows, and candidates are compared on the same examples. After each stage (by default 25 %
and 50 % of every set) the candidate's upper confidence bound on its *full-set* objective is

    UCB = sum_i w_i * p_i + z_look * sqrt(sum_i w_i^2 * q_i (1 - q_i) / n_i * (N_i - n_i) / (N_i - 1))

with p_i the mean over the n_i of N_i examples scored so far, q_i = (n_i p_i + 0.5) / (n_i + 1)
(so a perfect or empty record still has variance; q(1-q) bounds the variance of any score in
[0, 1] with that mean), and the last factor the finite-population correction: the full score is
the mean over the N_i examples the plain run would score, so the uncertainty shrinks to zero as
the sample approaches the whole set. If UCB < the best full-evaluation objective at the time the
candidate was submitted, it stops: its partial means are journaled as its metrics, with the
number of examples scored, and the optimizer is told the partial estimate.

Repeated looks: a candidate is looked at once per stage, and a stop at any look is final, so the
chance of wrongly stopping one whose full score would win is bounded by the sum over looks. `z`
states the campaign's one-sided level over all looks together (2.0: ~2.3 %); each of K looks uses
z_look = Phi^-1(1 - (1 - Phi(z)) / K) (Bonferroni). `python -m evomerge.bench racing` measures
the wrong-stop rate this gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import torch


@dataclass
class RacingRule:
    stages: list[float] = field(default_factory=lambda: [0.25, 0.5])
    z: float = 2.0
    seed: int = 0

    @property
    def z_look(self) -> float:
        """The per-look bound that keeps the level over all looks at `z`'s."""
        alpha = 1 - NormalDist().cdf(self.z)
        return NormalDist().inv_cdf(1 - alpha / len(self.stages))

    def bounds(self, sums: dict[str, float], counts: dict[str, int], totals: dict[str, int],
               weights: dict[str, float]) -> tuple[float, float]:
        """(estimate, upper bound) of the full-set objective from the examples scored so far."""
        est = var = 0.0
        for m, w in weights.items():
            n, total = counts[m], totals[m]
            p = sums[m] / n if n else 0.0
            q = (sums[m] + 0.5) / (n + 1)
            fpc = (total - n) / (total - 1) if total > 1 else 0.0
            est += w * p
            var += w * w * q * (1 - q) / max(n, 1) * fpc
        return est, est + self.z_look * math.sqrt(var)

    def order(self, size: int, which: int) -> list[int]:
        """The seeded visiting order of fitness set number `which` (size `size`)."""
        return np.random.default_rng([self.seed, which]).permutation(size).tolist()


def race(evaluators: list, model, weights: dict[str, float], incumbent: float | None, rule: RacingRule) -> tuple[dict, int, bool]:
    """(metrics, examples scored, stopped early) for one candidate."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    totals: dict[str, int] = {}
    orders = [rule.order(ev.n, k) for k, ev in enumerate(evaluators)]
    done = [0] * len(evaluators)
    examples = 0

    def advance(fraction: float) -> None:
        nonlocal examples
        for k, ev in enumerate(evaluators):
            target = ev.n if fraction >= 1 else max(1, math.ceil(fraction * ev.n))
            if target <= done[k]:
                continue
            with torch.no_grad():
                scores = ev.score_examples(model, orders[k][done[k]:target])
            for m, v in scores.items():
                sums[m] = sums.get(m, 0.0) + float(v.sum())
                counts[m] = counts.get(m, 0) + int(v.numel())
                totals[m] = ev.n
            examples += target - done[k]
            done[k] = target

    for fraction in rule.stages:
        advance(fraction)
        if incumbent is not None:
            _, upper = rule.bounds(sums, counts, totals, weights)
            if upper < incumbent:
                return {m: sums[m] / counts[m] for m in sums}, examples, True
    advance(1.0)
    return {m: sums[m] / counts[m] for m in sums}, examples, False
