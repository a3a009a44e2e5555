"""`simulate`: evaluation time and failures on demand, for benchmarking and testing executors.

    {task: simulate, seconds: 0.5, spread: 0.8, fail_rate: 0.1, seed: 0}

Real campaigns spend most of their time generating, and a candidate's generation length (hence
its time) depends on the candidate: some stop early, some talk to the token limit. This task
reproduces that without a large model. It reads the materialized model's weights — a fingerprint
of them decides, the same on every worker, device and thread count, how long this candidate takes
(lognormal: `seconds` the median, `spread` the sigma of its log) and whether it fails on its own
(`fail_rate`, raising CandidateError as a broken merge would) — then sleeps that long. Its metric
`simulated_seconds` is the time drawn. Pair it with a real task for a fitness signal; on its own
it is no objective worth searching.
"""

from __future__ import annotations

import hashlib
import math
import time
from statistics import NormalDist

import torch

from evomerge.errors import CandidateError, is_number


class Simulate:
    def __init__(self, seconds: float = 0.1, spread: float = 0.0, fail_rate: float = 0.0, seed: int = 0, split=None):
        for name, value, low, high in (("seconds", seconds, 0, 86400), ("spread", spread, 0, 5),
                                       ("fail_rate", fail_rate, 0, 1)):
            if not is_number(value) or not low <= value <= high:
                raise ValueError(f"{name} {value!r}: a number in [{low}, {high}]")
        self.seconds, self.spread, self.fail_rate, self.seed = float(seconds), float(spread), float(fail_rate), seed

    def draws(self, model: torch.nn.Module) -> tuple[float, float]:
        """Two uniforms in (0, 1) from the candidate's weights: the same candidate draws the same everywhere."""
        h = hashlib.sha256(str(self.seed).encode())
        with torch.no_grad():
            for name, p in model.named_parameters():
                h.update(name.encode())
                h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
        d = h.digest()
        return ((int.from_bytes(d[:8], "big") + 0.5) / 2**64, (int.from_bytes(d[8:16], "big") + 0.5) / 2**64)

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        u_time, u_fail = self.draws(model)
        seconds = self.seconds * math.exp(self.spread * NormalDist().inv_cdf(u_time))
        time.sleep(seconds)
        if u_fail < self.fail_rate:
            raise CandidateError(f"simulated failure (draw {u_fail:.3f} < fail_rate {self.fail_rate:g})")
        return {"simulated_seconds": seconds}

    def identity(self) -> dict:
        return {"task": "simulate", "split": "none", "n": 1, "seconds": self.seconds, "spread": self.spread,
                "fail_rate": self.fail_rate, "seed": self.seed}

    def examples_key(self) -> tuple[str, set[int]]:
        return "simulate", set()  # scores no examples: never overlaps a held-out set

    def metric_names(self) -> set[str]:
        return {"simulated_seconds"}
