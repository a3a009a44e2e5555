"""The Ray executor: one actor per worker on a Ray cluster, each holding its models for the whole campaign.

    executor:
      kind: ray
      address: local          # local: a private Ray instance started here (the default); auto: the cluster
                              #   `ray start --head` runs on this machine; host:port; ray://host:10001
      num_workers: auto       # auto: as many as the cluster's GPUs (or CPUs) hold at the sizes below
      num_gpus_per_worker: 1  # 0: CPU workers; 0.5: two workers share a GPU (small models)
      num_cpus_per_worker: 1  # also the torch threads of a CPU worker
      timeout: 1800           # seconds a candidate may take (default: none)
      retries: 2              # attempts after an infrastructure failure before the campaign stops

Each actor builds a Worker from the WorkerSpec (model paths and evaluator specs, a few kB) once —
its own SourceBank on its own device — then materializes and scores candidate after candidate;
a task carries one recipe and a result a few numbers. The driver keeps a queue: an idle actor
gets the next task at once, and results are taken with `ray.wait` as they finish, in any order.

Faults: an actor that dies (its process killed, its node lost) comes back as an infrastructure
Result, which the campaign resubmits (`retries` times per candidate, then it stops), and the
actor is replaced, on whichever node has room; until the replacement is up the campaign runs on
fewer workers. An actor that cannot start (a model folder missing on its node) stops the
campaign with its error. A candidate past `timeout` fails on its own (journaled, told as a
penalty) and its actor is replaced, since a worker stuck in it can do nothing else.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import replace

from evomerge.errors import EvomergeError, is_count, is_number, one_line
from evomerge.executors import Executor, register_executor
from evomerge.worker import Result, Task, Worker, WorkerSpec

START_TIMEOUT = 600.0  # seconds with no worker up and none able to start before the campaign stops
POLL = 2.0  # seconds between checks of timeouts and starting workers while waiting for results


class EvalActor:
    """Lives in a Ray worker process: one Worker (sources loaded once), scoring task after task."""

    def __init__(self, spec: WorkerSpec, root: str | None, threads: int):
        self.error = None
        try:
            if root and os.path.isdir(root):  # relative data paths mean what they meant where the campaign started
                os.chdir(root)
            import torch

            torch.set_num_threads(threads)
            self.worker = Worker(spec)
        except EvomergeError as exc:
            self.error = str(exc)
        except Exception as exc:  # out of memory loading the bank, a missing model on this node
            self.error = one_line(exc)

    def ready(self) -> dict:
        import ray

        return {"error": self.error, "pid": os.getpid(), "host": socket.gethostname(),
                "node": ray.get_runtime_context().get_node_id()}

    def run(self, task: Task) -> Result:
        return self.worker.run(task)


def _ray():
    try:
        import ray
    except ImportError:
        raise EvomergeError("executor kind 'ray' needs Ray, which is not installed here: "
                            "pip install 'evomerge-search[ray]'") from None
    return ray


def _probe(address: str) -> None:
    """An explicit host:port must answer within seconds: ray.init would retry an unreachable one for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise EvomergeError(f"config field 'executor.address': bad value {address!r}; allowed: local, auto, "
                            "host:port or ray://host:10001")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise EvomergeError(f"config field 'executor.address': nothing answers at {address} ({exc.strerror or exc}); "
                            "start the head with `ray start --head`, check the address, or use --address local "
                            "for a private instance") from None


def _connect(ray, address: str) -> None:
    options = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address not in ("local", "auto"):
        _probe(address)
    try:
        if address == "local":
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private instance needs no token on disk
            ray.init(include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise EvomergeError(f"config field 'executor.address': cannot reach a Ray cluster at {address!r} "
                            f"({str(exc).splitlines()[0][:200]}); start one with `ray start --head`, or use "
                            "--address local for a private one") from None


@register_executor("ray")
class RayExecutor(Executor):
    KEYS = ("kind", "retries", "address", "num_workers", "num_gpus_per_worker", "num_cpus_per_worker", "timeout")

    @classmethod
    def validate(cls, block: dict, where: str = "executor") -> dict:
        out = super().validate(block, where)
        address = out.setdefault("address", "local")
        if not isinstance(address, str) or not address:
            raise EvomergeError(f"config field '{where}.address': bad value {address!r}; allowed: local, auto, "
                                "host:port or ray://host:10001")
        workers = out.setdefault("num_workers", "auto")
        if workers != "auto" and not is_count(workers, 1):
            raise EvomergeError(f"config field '{where}.num_workers': bad value {workers!r}; allowed: auto or a "
                                "positive integer")
        gpus = out.setdefault("num_gpus_per_worker", 0)
        if not is_number(gpus) or gpus < 0 or gpus > 1 and gpus != int(gpus):
            raise EvomergeError(f"config field '{where}.num_gpus_per_worker': bad value {gpus!r}; allowed: 0 (CPU), "
                                "a fraction of one GPU (0.5), or a whole number of GPUs")
        cpus = out.setdefault("num_cpus_per_worker", 1)
        if not is_number(cpus) or cpus <= 0:
            raise EvomergeError(f"config field '{where}.num_cpus_per_worker': bad value {cpus!r}; allowed: a "
                                "positive number")
        timeout = out.setdefault("timeout", None)
        if timeout is not None and (not is_number(timeout) or timeout <= 0):
            raise EvomergeError(f"config field '{where}.timeout': bad value {timeout!r}; allowed: seconds a "
                                "candidate may take (a positive number), or null for no limit")
        return out

    @classmethod
    def prepare(cls, block: dict) -> dict:
        """Reach the cluster and check it can hold a worker, before the campaign writes anything."""
        ray = _ray()
        owned = False
        if not ray.is_initialized():
            _connect(ray, block["address"])
            owned = True
        resources = ray.cluster_resources()
        gpus, cpus = block["num_gpus_per_worker"], block["num_cpus_per_worker"]
        if gpus and resources.get("GPU", 0) < gpus or resources.get("CPU", 0) < cpus:
            if owned:
                ray.shutdown()
            raise EvomergeError(f"config field 'executor.num_gpus_per_worker': {gpus:g} GPU(s) and {cpus:g} CPU(s) per "
                                f"worker, but the Ray cluster has {resources.get('GPU', 0):g} GPU(s) and "
                                f"{resources.get('CPU', 0):g} CPU(s); set 0 GPUs for CPU workers, or add nodes")
        workers = block["num_workers"]
        if workers == "auto":
            workers = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1) // cpus)
        return {"owned": owned, "slots": max(1, workers)}

    @classmethod
    def create(cls, block: dict, spec: WorkerSpec, prepared: dict | None = None) -> "RayExecutor":
        prepared = prepared or {}
        return cls(block, spec, prepared.get("session") or cls.prepare(block), prepared.get("root"))

    def __init__(self, block: dict, spec: WorkerSpec, session: dict, root: str | None = None):
        self.ray = _ray()
        self.owned = session["owned"]
        try:
            self.slots = session["slots"]
            self.gpus, self.cpus = block["num_gpus_per_worker"], block["num_cpus_per_worker"]
            self.timeout = block.get("timeout")
            self.spec = replace(spec, device="cuda" if self.gpus else "cpu")
            self.root = root
            self.actor_class = self.ray.remote(EvalActor).options(
                num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD")
            self.actors: dict[int, object] = {}
            self.starting: dict[object, tuple[int, float]] = {}  # ready() ref -> (worker, since)
            self.running: dict[object, tuple[int, Task, float]] = {}  # run() ref -> (worker, task, since)
            self.idle: deque[int] = deque()
            self.queue: deque[Task] = deque()
            self.finished: deque[Result] = deque()  # results made here (timeouts), handed out first
            self.replaced = 0
            self.lost_at_start = 0
            self.info: dict[int, dict] = {}  # worker -> {pid, host, node} once it is up
            for i in range(self.slots):
                self._start(i)
            self._await_start()
        except BaseException:
            self.close()
            raise

    # -- workers --------------------------------------------------------------------------------

    def _start(self, i: int) -> None:
        threads = max(1, int(self.cpus))
        self.actors[i] = self.actor_class.remote(self.spec, self.root, threads)
        self.starting[self.actors[i].ready.remote()] = (i, time.time())

    def _await_start(self) -> None:
        """Block until every first worker has loaded its models, so that start-up is not charged to the
        first candidates; a worker that cannot find room within a minute is waited for in the background."""
        began = time.time()
        while self.starting and not (self.idle and time.time() - began > 60):
            ready, _ = self.ray.wait(list(self.starting), num_returns=1, timeout=POLL)
            for ref in ready:
                self._started(ref)
            self._check_clock()

    def _replace(self, i: int) -> None:
        try:
            self.ray.kill(self.actors[i], no_restart=True)
        except Exception:  # already gone with its node
            pass
        self.replaced += 1
        self._start(i)

    def _started(self, ref) -> None:
        i, _ = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:  # its process or node went away while it loaded
            self.lost_at_start += 1
            if self.lost_at_start > 2 + self.slots:  # not bad luck: e.g. killed for memory on every start
                raise EvomergeError(f"Ray workers died while loading their models {self.lost_at_start} times (the "
                                    f"last: {_first(exc)}); check the nodes' memory against `evomerge run --dry-run`'s "
                                    "per-worker estimate") from None
            self._replace(i)
            return
        if info["error"]:
            raise EvomergeError(f"a Ray worker on {info['host']} could not start: {info['error']}")
        self.info[i] = info
        self.idle.append(i)

    # -- tasks ----------------------------------------------------------------------------------

    def submit(self, task: Task) -> None:
        self.queue.append(task)

    def outstanding(self) -> int:
        return len(self.queue) + len(self.running) + len(self.finished)

    def _dispatch(self) -> None:
        while self.queue and self.idle:
            i = self.idle.popleft()
            task = self.queue.popleft()
            self.running[self.actors[i].run.remote(task)] = (i, task, time.time())

    def next_result(self) -> Result:
        ray = self.ray
        while True:
            self._dispatch()
            if self.finished:
                return self.finished.popleft()
            refs = list(self.running) + list(self.starting)
            if not refs:
                raise EvomergeError("no Ray worker is left to run the campaign's candidates")
            ready, _ = ray.wait(refs, num_returns=1, timeout=self._wait())
            if not ready:
                self._check_clock()
                continue
            ref = ready[0]
            if ref in self.starting:
                self._started(ref)
                continue
            i, task, since = self.running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self._replace(i)
                return Result(task.cid, task.role, None, None, f"Ray worker lost mid-candidate ({_first(exc)})",
                              "infrastructure", True, 0.0, time.time() - since)
            except Exception as exc:  # the task itself failed in Ray (serialization, an object lost)
                self.idle.append(i)
                return Result(task.cid, task.role, None, None, f"Ray task failed ({_first(exc)})", "infrastructure",
                              True, 0.0, time.time() - since)
            self.idle.append(i)
            return result

    def _wait(self) -> float:
        if self.timeout and self.running:
            soonest = min(since for _, _, since in self.running.values()) + self.timeout
            return max(0.01, min(POLL, soonest - time.time()))
        return POLL

    def _check_clock(self) -> None:
        now = time.time()
        if self.timeout:
            for ref, (i, task, since) in list(self.running.items()):
                if now - since > self.timeout:
                    del self.running[ref]
                    self._replace(i)
                    self.finished.append(Result(
                        task.cid, task.role, None, None, f"timed out after {self.timeout:g} s (executor.timeout); "
                        "its worker was replaced", "candidate", False, 0.0, now - since))
        if not self.idle and not self.running and self.starting \
                and all(now - since > START_TIMEOUT for _, since in self.starting.values()):
            raise EvomergeError(
                f"no Ray worker could start within {START_TIMEOUT:.0f} s: each asks for {self.cpus:g} CPU and "
                f"{self.gpus:g} GPU, the cluster has {self.ray.available_resources()} free; lower "
                "executor.num_workers or the per-worker resources, or add nodes")

    def close(self) -> None:
        for actor in getattr(self, "actors", {}).values():
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = {}
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
            self.owned = False


def _first(exc: BaseException) -> str:
    """The first meaningful line of a Ray error (they run to pages)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
