"""Executors: where workers live. The interface is submit / next_result; kinds plug in by registration.

The driver submits Tasks and takes Results as they finish, in any order; `slots` says how many
candidates run at once, so the campaign knows when a worker is free. An executor never
interprets a result (that is the campaign's job) and never writes the journal (the driver alone
does); a worker it lost comes back as an infrastructure Result for the campaign to retry.
`local` (the default) runs one Worker in this process on one device; `ray`
(`evomerge.ray_executor`) runs one actor per worker on a Ray cluster.

Each kind validates its own config block:

    executor: {kind: local, device: cpu, retries: 2}
    executor: {kind: ray, address: auto, num_workers: 8, num_gpus_per_worker: 1, timeout: 1800}
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

from evomerge.errors import EvomergeError, check_keys, close_match, is_count
from evomerge.worker import Result, Task, Worker, WorkerSpec


class Executor:
    kind: str = ""
    KEYS: tuple[str, ...] = ("kind", "retries")
    slots: int = 1  # candidates that run at once

    @classmethod
    def validate(cls, block: dict, where: str = "executor") -> dict:
        """The block with defaults filled in, or one line naming the bad field."""
        check_keys(block, cls.KEYS, where)
        retries = block.get("retries", 2)
        if not is_count(retries):
            raise EvomergeError(f"config field '{where}.retries': bad value {retries!r}; allowed: a non-negative "
                                "integer (attempts after an infrastructure failure before the campaign stops)")
        return dict(block, kind=cls.kind, retries=retries)

    @classmethod
    def prepare(cls, block: dict) -> dict:
        """Checks that need the outside world (a cluster to reach), run before the campaign writes anything.
        What it returns reaches `create` as prepared["session"]."""
        return {}

    @classmethod
    def create(cls, block: dict, spec: WorkerSpec, prepared: dict | None = None) -> "Executor":
        """An executor for this block. `prepared`: objects the driver already built (evaluators, tokenizer)."""
        raise NotImplementedError

    def submit(self, task: Task) -> None:
        raise NotImplementedError

    def outstanding(self) -> int:
        """Tasks submitted whose results have not been returned yet."""
        raise NotImplementedError

    def next_result(self) -> Result:
        """Block until a submitted task finishes; its Result (a lost worker is an infrastructure Result)."""
        raise NotImplementedError

    def collect(self) -> Iterator[Result]:
        """Yield results as candidates finish, until nothing submitted is left."""
        while self.outstanding():
            yield self.next_result()

    def close(self) -> None:
        """Release workers and memory."""


EXECUTORS: dict[str, type[Executor]] = {}


def register_executor(kind: str):
    def add(cls: type[Executor]) -> type[Executor]:
        cls.kind = kind
        EXECUTORS[kind] = cls
        return cls

    return add


def executor_kind(kind: object) -> type[Executor]:
    if not isinstance(kind, str) or kind not in EXECUTORS:
        raise EvomergeError(f"config field 'executor.kind': bad value {kind!r}; allowed: {', '.join(EXECUTORS)}"
                            f"{close_match(kind, EXECUTORS)}")
    return EXECUTORS[kind]


@register_executor("local")
class LocalExecutor(Executor):
    """In-process, one candidate at a time, on the campaign's device (CPU by default)."""

    KEYS = ("kind", "device", "retries")

    @classmethod
    def validate(cls, block: dict, where: str = "executor") -> dict:
        out = super().validate(block, where)
        device = out.setdefault("device", "cpu")
        if not isinstance(device, str):
            raise EvomergeError(f"config field '{where}.device': bad value {device!r}; allowed: cpu, cuda, cuda:<i>")
        return out

    @classmethod
    def create(cls, block: dict, spec: WorkerSpec, prepared: dict | None = None) -> "LocalExecutor":
        prepared = prepared or {}
        return cls(Worker(spec, prepared.get("evaluators"), prepared.get("tokenizer")))

    def __init__(self, worker: Worker):
        self.worker = worker
        self.queue: deque[Task] = deque()

    def submit(self, task: Task) -> None:
        self.queue.append(task)

    def outstanding(self) -> int:
        return len(self.queue)

    def next_result(self) -> Result:
        return self.worker.run(self.queue.popleft())


# Kinds that live in their own module (and import their heavy library only when used).
from evomerge import ray_executor  # noqa: E402,F401  registers "ray"
