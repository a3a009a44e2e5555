"""Executors: where workers live. The interface is submit / collect; kinds plug in by registration.

The driver submits Tasks and takes Results as they finish, in any order. An executor never
interprets a result (that is the campaign's job) and never writes the journal (the driver alone
does). `local` (the default) runs one Worker in this process on one device; a Ray executor with
GPU actors registers the same way under `executor.kind: ray`.

Each kind validates its own config block:

    executor: {kind: local, device: cpu, retries: 2}
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

from evomerge.errors import EvomergeError, check_keys, close_match, is_count
from evomerge.worker import Result, Task, Worker, WorkerSpec


class Executor:
    kind: str = ""
    KEYS: tuple[str, ...] = ("kind", "retries")

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
    def create(cls, block: dict, spec: WorkerSpec, prepared: dict | None = None) -> "Executor":
        """An executor for this block. `prepared`: objects the driver already built (evaluators, tokenizer)."""
        raise NotImplementedError

    def submit(self, task: Task) -> None:
        raise NotImplementedError

    def collect(self) -> Iterator[Result]:
        """Yield results as candidates finish, until nothing submitted is left."""
        raise NotImplementedError

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

    def collect(self) -> Iterator[Result]:
        while self.queue:
            yield self.worker.run(self.queue.popleft())
