"""The Ray executor on real local Ray clusters: the same front as the local executor, a worker process
killed and a node removed mid-campaign, failing and slow candidates, kill -9 of the driver and resume,
and campaigns without a generation barrier."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray

from evomerge.campaign import CampaignRunner
from evomerge.config import parse_campaign
from evomerge.journal import Journal
from killing import run_until
from test_campaign import evomerge_cli, front_set, tiny_config, write_config

SLOW = {"task": "simulate", "seconds": 0.3}  # long enough for a kill to land mid-candidate


def config(fam, **over):
    return tiny_config(fam, **({"budget": 24} | over))


def trace(folder):
    """Every candidate as (generation, slot, genome, objectives): what 'the same campaign' means."""
    j = Journal(folder)
    rows = [(r.generation, r.slot, r.genome, {k: round(v, 9) for k, v in (r.objectives or {}).items()}, r.status)
            for r in j.candidates()]
    j.close()
    return rows


@pytest.fixture(scope="module")
def reference(llama_family, tmp_path_factory):
    """The local executor's campaign: what every Ray run with the barrier must reproduce."""
    folder = tmp_path_factory.mktemp("reference") / "local"
    CampaignRunner(parse_campaign(config(llama_family)), folder, progress=False).run()
    return {"front": front_set(folder), "trace": trace(folder)}


@pytest.fixture
def ray_local():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield
    ray.shutdown()


def kill_when(runner, done_at_least, kill):
    """In a thread: once the journal holds `done_at_least` results and a worker is mid-candidate, call
    kill(executor, worker, task); returns the thread and a dict that receives the task killed."""
    seen: dict = {}

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline:
            ex = runner._executor
            if ex is not None and getattr(ex, "running", None):
                j = Journal(runner.folder, create=False)
                done = j.count("done")
                j.close()
                running = [(i, task, since) for i, task, since in list(ex.running.values()) if i in ex.info]
                fresh = [(i, task) for i, task, since in running if time.time() - since < 0.1]
                if done >= done_at_least and fresh and kill(ex, *fresh[0]):
                    seen["task"] = fresh[0][1]
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, seen


def check_complete(folder, budget, lost_cid, error):
    rows = Journal(folder).candidates()
    assert len(rows) == budget and all(r.status == "done" for r in rows)
    assert len({(r.generation, r.slot) for r in rows}) == budget
    lost = {r.id: r for r in rows if r.attempts != 1}
    assert list(lost) == [lost_cid], "only the lost candidate ran twice; nothing finished was evaluated again"
    assert lost[lost_cid].attempts == 2 and error in lost[lost_cid].last_error


def test_ray_workers_reproduce_the_local_front(llama_family, tmp_path, reference, ray_local):
    runner = CampaignRunner(parse_campaign(config(llama_family, executor={"kind": "ray", "num_workers": 2})),
                            tmp_path / "ray", progress=False)
    runner.run()
    assert runner._executor.slots == 2 and len(runner._executor.info) == 2
    assert len({info["pid"] for info in runner._executor.info.values()}) == 2
    assert trace(tmp_path / "ray") == reference["trace"]
    assert front_set(tmp_path / "ray") == reference["front"]


def lose_a_worker(fam, folder, reference, lose) -> None:
    """Two workers on slow candidates; once 5 are done, `lose(executor, worker, task)` strikes a worker
    mid-candidate. The campaign must end complete, with one resubmission, on the local front."""
    cfg = config(fam, executor={"kind": "ray", "num_workers": 2})
    cfg["fitness"] = cfg["fitness"] + [SLOW]
    runner = CampaignRunner(parse_campaign(cfg), folder, progress=False)
    thread, seen = kill_when(runner, 5, lose)
    runner.run()
    thread.join(1)
    assert runner._executor.replaced == 1
    check_complete(folder, 24, seen["task"].cid, "Ray worker lost mid-candidate")
    assert front_set(folder) == reference["front"]


def test_a_worker_killed_mid_candidate_is_replaced_and_its_candidate_resubmitted(llama_family, tmp_path, reference,
                                                                                  ray_local):
    def kill(ex, i, task):
        os.kill(ex.info[i]["pid"], signal.SIGKILL)
        return True

    lose_a_worker(llama_family, tmp_path / "k", reference, kill)


def test_a_node_removed_mid_campaign_costs_one_resubmission(llama_family, tmp_path, reference):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")

    def remove(ex, i, task):
        if ex.info[i]["node"] != node.node_id:
            return False
        cluster.remove_node(node)
        return True

    try:
        # One CPU per worker and the head has one: the replacement waits for room, the campaign goes on with one.
        lose_a_worker(llama_family, tmp_path / "n", reference, remove)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_failing_and_slow_candidates_are_journaled_and_the_campaign_goes_on(llama_family, tmp_path, ray_local):
    cfg = config(llama_family, budget=16, executor={"kind": "ray", "num_workers": 2, "timeout": 1.0})
    cfg["fitness"] = cfg["fitness"] + [{"task": "simulate", "seconds": 0.1, "spread": 2.0, "fail_rate": 0.15}]
    runner = CampaignRunner(parse_campaign(cfg), tmp_path / "f", progress=False)
    out = runner.run()
    rows = Journal(tmp_path / "f").candidates()
    assert len(rows) == 16 and out.evaluated == 16
    failed = [r for r in rows if r.status == "failed"]
    simulated = [r for r in failed if r.error.startswith("simulated failure")]
    timed_out = [r for r in failed if r.error.startswith("timed out after 1 s")]
    assert simulated and timed_out and len(simulated) + len(timed_out) == len(failed)
    assert all(r.error_kind == "candidate" and r.attempts == 1 for r in failed)
    assert runner._executor.replaced == len(timed_out)  # a worker stuck in a candidate is replaced
    assert not {r.id for r in failed} & {m.id for m in out.front}
    done = [r for r in rows if r.status == "done"]
    assert all(r.metrics["simulated_seconds"] <= 1.0 for r in done)


def _spawn_until(cfg_path, folder, at_least):
    proc, seen = run_until(cfg_path, folder, folder / "journal.sqlite", at_least=at_least, timeout=240,
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.wait()
    try:  # kill -9 leaves Ray's agents of a private instance behind: clear the run's process group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return seen


def test_kill_9_of_the_driver_then_resume_on_ray_ends_on_the_local_front(llama_family, tmp_path, reference):
    cfg = write_config(tmp_path, config(llama_family, executor={"kind": "ray", "num_workers": 2}))
    folder = tmp_path / "killed"
    seen = _spawn_until(cfg, folder, 10)
    assert 10 <= seen < 24
    before = {r.id: r.finished for r in Journal(folder).candidates("done")}
    res = evomerge_cli("resume", folder, "--quiet", start_new_session=True)
    assert res.returncode == 0, res.stderr
    after = Journal(folder).candidates()
    assert {r.id: r.finished for r in after if r.id in before} == before  # nothing finished ran again
    assert trace(folder) == reference["trace"] and front_set(folder) == reference["front"]


def test_without_the_barrier_on_one_worker_cma_is_the_generational_campaign(llama_family, tmp_path, reference):
    """One worker, no barrier: asked one at a time and told as they come, CMA-ES sees exactly the generations."""
    CampaignRunner(parse_campaign(config(llama_family, barrier=False)), tmp_path / "a", progress=False).run()
    assert trace(tmp_path / "a") == reference["trace"]
    rows = Journal(tmp_path / "a").candidates()
    assert [r.told for r in rows] == list(range(24))
    assert [r.asked_after for r in rows] == list(range(24))  # one worker: each asked once the last was told


def test_without_the_barrier_kill_9_and_resume_replay_the_told_order(llama_family, tmp_path):
    cfg = config(llama_family, budget=32, barrier=False, executor={"kind": "ray", "num_workers": 2})
    cfg["fitness"] = cfg["fitness"] + [{"task": "simulate", "seconds": 0.05, "spread": 1.0}]
    path = write_config(tmp_path, cfg)
    folder = tmp_path / "async"
    seen = _spawn_until(path, folder, 12)
    assert 12 <= seen < 32
    j = Journal(folder)
    before = {r.id: (r.genome, r.told, r.asked_after, r.finished) for r in j.candidates() if r.told is not None}
    checkpoints = {c["generation"]: c["digest"] for c in j.checkpoints()}
    j.close()
    res = evomerge_cli("resume", folder, "--quiet", start_new_session=True)
    assert res.returncode == 0, res.stderr  # a replay that asked another genome would stop with "diverged"
    rows = Journal(folder).candidates()
    assert len(rows) == 32 and all(r.status == "done" for r in rows)
    assert {r.id: (r.genome, r.told, r.asked_after, r.finished) for r in rows if r.id in before} == before
    assert sorted(r.told for r in rows) == list(range(32))
    assert [r.asked_after for r in rows] == sorted(r.asked_after for r in rows)
    # Asked ahead: with two workers, some candidates were asked before the previous generation was told.
    assert any(r.asked_after % 8 for r in rows)
    after = {c["generation"]: c["digest"] for c in Journal(folder).checkpoints()}
    assert len(after) == 4 and {g: after[g] for g in checkpoints} == checkpoints


def test_the_demo_runs_on_ray_from_the_command_line(demo_cache, tmp_path):
    env = dict(os.environ, EVOMERGE_CACHE=str(demo_cache))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "evomerge", "run", os.path.join(root, "experiments", "demo.yaml"),
                          "--out", str(tmp_path / "demo"), "--executor", "ray", "--quiet"],
                         capture_output=True, text=True, env=env, start_new_session=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "front" in res.stdout and "held-out" in res.stdout
    j = Journal(tmp_path / "demo")
    assert j.count("done") == 70 and j.get("done") is True
    assert j.get("config")["executor"]["kind"] == "ray"


def test_a_worker_that_cannot_load_its_models_stops_the_campaign_with_its_error(llama_family, tmp_path, ray_local):
    import shutil

    from evomerge.errors import EvomergeError

    fam = {k: shutil.copytree(v, tmp_path / k) for k, v in llama_family.items()}
    runner = CampaignRunner(parse_campaign(config(fam, executor={"kind": "ray", "num_workers": 2})), tmp_path / "c",
                            progress=False)
    shutil.rmtree(fam["expert1"])  # gone after pre-flight: as if missing on the workers' nodes
    with pytest.raises(EvomergeError, match=r"a Ray worker on .* could not start: .*expert1") as err:
        runner.run()
    assert "\n" not in str(err.value)
    assert Journal(tmp_path / "c").count("done", "failed") == 0 and runner._executor is None
