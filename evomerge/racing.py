"""Racing: score a candidate on growing subsets and stop it once it cannot plausibly beat the best.

The rule. The objective is a weighted sum (weights >= 0, maximized) of per-example scores in
[0, 1] (exact match, accuracy). After each stage (by default 25 % and 50 % of every fitness set)
the candidate's upper confidence bound is

    UCB = sum_i w_i * p_i + z * sqrt(sum_i w_i^2 * q_i (1 - q_i) / n_i)

with p_i the mean over the n_i examples scored so far and q_i = (n_i p_i + 0.5) / (n_i + 1) (so a
perfect or empty record still has variance). If UCB < the best full-evaluation objective at the
time the candidate was submitted, it stops: its partial means are journaled as its metrics, with
the number of examples scored, and the optimizer is told the partial estimate. z = 2 is a one-sided
~97.7 % normal bound; raise it to prune less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class RacingRule:
    stages: list[float] = field(default_factory=lambda: [0.25, 0.5])
    z: float = 2.0

    def bounds(self, sums: dict[str, float], counts: dict[str, int], weights: dict[str, float]) -> tuple[float, float]:
        est = var = 0.0
        for m, w in weights.items():
            n = counts[m]
            p = sums[m] / n if n else 0.0
            q = (sums[m] + 0.5) / (n + 1)
            est += w * p
            var += w * w * q * (1 - q) / max(n, 1)
        return est, est + self.z * math.sqrt(var)


def race(evaluators: list, model, weights: dict[str, float], incumbent: float | None, rule: RacingRule) -> tuple[dict, int, bool]:
    """(metrics, examples scored, stopped early) for one candidate."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    done = [0] * len(evaluators)
    examples = 0

    def advance(fraction: float) -> None:
        nonlocal examples
        for k, ev in enumerate(evaluators):
            target = ev.n if fraction >= 1 else max(1, math.ceil(fraction * ev.n))
            if target <= done[k]:
                continue
            with torch.no_grad():
                scores = ev.score_examples(model, done[k], target)
            for m, v in scores.items():
                sums[m] = sums.get(m, 0.0) + float(v.sum())
                counts[m] = counts.get(m, 0) + int(v.numel())
            examples += target - done[k]
            done[k] = target

    for fraction in rule.stages:
        advance(fraction)
        if incumbent is not None:
            _, upper = rule.bounds(sums, counts, weights)
            if upper < incumbent:
                return {m: sums[m] / counts[m] for m in sums}, examples, True
    advance(1.0)
    return {m: sums[m] / counts[m] for m in sums}, examples, False
