"""Whole sweeps through `run_sweep`, on real Ray, Optuna and Parquet: a 3-node cluster with 8 concurrent
trials, a worker node lost mid-trial, and a driver killed and resumed (local Ray in subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import ray

from spt_ray import SweepSpec, duckdb_connect, read_results, run_sweep
from spt_ray.store import get_store

pytestmark = pytest.mark.slow
TINY_TRAIN = {"epochs": 1, "batch_size": 32, "warmup_epochs": 0}


def _spec(root: str, storage: Path, backbone, **overrides) -> SweepSpec:
    base = dict(name="t", data_root=root, storage=str(storage), tasks=["shapes", "count"],
                backbone=backbone.to_dict(), num_samples=2, max_concurrent=2, train=TINY_TRAIN, run_final=False,
                sensitivity={"num_batches": 2}, seed=3)
    return SweepSpec.from_dict({**base, **overrides})


def _overlap(table) -> int:
    """Most trials running at the same instant, from each trial's end time and wall time."""
    events = []
    for r in table.to_pylist():
        if r["row_kind"] == "trial":
            end = r["created_at"].timestamp()
            events += [(end - r["wall_s"], 1), (end, -1)]
    running = peak = 0
    for _, step in sorted(events):
        running += step
        peak = max(peak, running)
    return peak


def test_three_nodes_eight_concurrent_trials_share_two_computations(ray_cluster, ray_mini_root, ray_backbone,
                                                                    tmp_path):
    spec = _spec(ray_mini_root, tmp_path, ray_backbone, name="multi", num_samples=4, max_concurrent=8,
                 resources={"cpu": 0.5}, multi_objective=True)  # NSGA-II per task, no ASHA
    result = run_sweep(spec)
    assert (result.store_stats["computed"], result.store_stats["loaded_from_disk"]) == (2, 0)
    table = read_results(tmp_path, "multi")
    trials = [r for r in table.to_pylist() if r["row_kind"] == "trial"]
    assert len(trials) == 8 and Counter(r["task"] for r in trials) == {"shapes": 4, "count": 4}
    assert len({r["node_id"] for r in trials}) >= 2  # trials ran on several nodes ...
    for task in ("shapes", "count"):  # ... and all of a task's trials read the one object the store put
        objects = {r["ranking_object"] for r in trials if r["task"] == task}
        assert objects == {result.sensitivity[task]["object"]}
    assert _overlap(table) >= 4
    assert set(result.best) == {"shapes", "count"}
    for task, front in result.pareto.items():  # a Pareto front per task (val_acc max, trainable_params min)
        assert front and all(r["task"] == task and r["status"] == "completed" for r in front)
        params = [r["trainable_params"] for r in front]
        accs = [r["val_acc"] for r in front]
        assert params == sorted(params) and accs == sorted(accs)  # more parameters only if more accurate
    # the ranking serves every point of the space (no trial read the full map); on the 0.7M-entry mini ViT
    # it is about a quarter of the fp32 map's bytes, 3.5% at ViT-B/16 (tests/test_store_scale.py)
    assert result.sensitivity["shapes"]["ranking_bytes"] < result.sensitivity["shapes"]["full_map_bytes"] / 3
    assert result.store_stats["full_map_reads"] == 0 and {r["plan_source"] for r in trials} <= {"ranking", "layout"}


def _wait(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def test_worker_node_lost_mid_trial_resumes_from_checkpoint(ray_cluster, ray_mini_root, ray_backbone, tmp_path):
    victim = ray_cluster.add_node(num_cpus=1, resources={"spt_victim": 1}, object_store_memory=96 * 2**20)
    ray_cluster.wait_for_nodes()
    epochs = 6
    spec = _spec(ray_mini_root, tmp_path, ray_backbone, name="nodeloss", tasks=["shapes"], num_samples=1,
                 max_concurrent=1, train={"epochs": epochs, "batch_size": 8, "warmup_epochs": 0}, reuse_actors=False,
                 resources={"cpu": 1, "custom": {"spt_victim": 1}}, scheduler={"kind": "fifo"}, checkpoint_every=2)
    outcome: dict = {}
    driver = threading.Thread(target=lambda: outcome.update(result=run_sweep(spec)), daemon=True)
    driver.start()
    experiment = tmp_path / "tune" / "nodeloss-sweep"
    _wait(lambda: any(experiment.glob("*/checkpoint_00000[0-9]")), 180, "the first checkpoint")
    # the victim goes first: starting the spare takes seconds, in which the trial could finish on the victim
    ray_cluster.remove_node(victim, allow_graceful=False)
    spare = ray_cluster.add_node(num_cpus=1, resources={"spt_victim": 1}, object_store_memory=96 * 2**20)
    driver.join(timeout=240)
    assert not driver.is_alive() and "result" in outcome
    reports = [r for r in read_results(tmp_path, "nodeloss").to_pylist() if r["row_kind"] == "report"]
    trial = [r for r in read_results(tmp_path, "nodeloss").to_pylist() if r["row_kind"] == "trial"]
    assert sorted(r["epoch"] for r in reports) == list(range(1, epochs + 1))  # every epoch once, none lost
    assert len(trial) == 1 and trial[0]["status"] == "completed" and trial[0]["restarts"] >= 1
    by_epoch = {r["epoch"]: r for r in reports}
    assert by_epoch[1]["node_id"] == victim.node_id and by_epoch[epochs]["node_id"] == spare.node_id
    # checkpoint_every 2: even epochs save, odd ones only report (the restart resumed from an even epoch)
    assert {e: r["checkpoint_s"] > 0 for e, r in by_epoch.items()} == {e: e % 2 == 0 for e in by_epoch}
    ray_cluster.remove_node(spare)


def test_a_restart_without_a_checkpoint_is_counted(ray_cluster, tmp_path):
    from ray import tune
    from ray.tune import FailureConfig, RunConfig, Tuner

    from spt_ray.trainable import count_start

    def fails_on_its_first_start(config):
        """Raises on its first start before any checkpoint (as a driver killed or a node lost before Tune
        registered one): Tune restarts it from scratch, which a checkpoint cannot count."""
        n = count_start()
        if n == 0:
            raise RuntimeError("first start fails")
        tune.report({"restarts": n})

    grid = Tuner(fails_on_its_first_start, run_config=RunConfig(
        name="restarts", storage_path=str(tmp_path), failure_config=FailureConfig(max_failures=2), verbose=0)).fit()
    assert not grid.errors and grid[0].metrics["restarts"] == 1


DRIVER = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from spt_ray import SweepSpec, run_sweep
result = run_sweep(SweepSpec.from_dict(json.loads(open(sys.argv[1]).read())))
print("SWEEP-DONE", json.dumps(result.store_stats))
"""


@pytest.fixture
def ray_tmpdir():
    """A short RAY_TMPDIR for driver subprocesses (their local Ray), removed afterwards."""
    base = f"/tmp/ray-spt-{os.getpid()}-drivers"
    os.makedirs(base, exist_ok=True)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _driver(tmp_path: Path, spec: dict, tag: str, base: str) -> subprocess.Popen:
    (tmp_path / f"{tag}.json").write_text(json.dumps(spec))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "RAY_TMPDIR": base, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / f"{tag}.json")], env=env,
                            stdout=open(tmp_path / f"{tag}.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_killed_sweep_resumes_without_duplicates_or_recomputation(ray_mini_root, ray_backbone, tmp_path,
                                                                  ray_tmpdir):
    spec = _spec(ray_mini_root, tmp_path, ray_backbone, name="resume", address="local",
                 train={"epochs": 2, "batch_size": 32, "warmup_epochs": 0}, baselines=["linear"],
                 run_final=True, final_seeds=[42]).to_dict()
    first = _driver(tmp_path, spec, "first", ray_tmpdir)
    try:  # kill the driver (and the local Ray it started) once some trials have finished
        _wait(lambda: sum(r["row_kind"] == "trial" for r in read_results(tmp_path, "resume").to_pylist()) >= 2
              or first.poll() is not None, 300, "two finished trials", interval=1.0)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = read_results(tmp_path, "resume")
    assert 2 <= sum(r == "trial" for r in before.column("row_kind").to_pylist()) < 8

    second = _driver(tmp_path, {**spec, "resume": True}, "second", ray_tmpdir)
    assert second.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    stats = json.loads(log.split("SWEEP-DONE", 1)[1].strip().splitlines()[0])
    assert (stats["computed"], stats["loaded_from_disk"]) == (0, 2)  # maps reloaded from disk

    raw = read_results(tmp_path, "resume", dedup=False)
    table = read_results(tmp_path, "resume")
    assert raw.num_rows == table.num_rows == len(set(table.column("row_id").to_pylist()))
    rows = table.to_pylist()
    trials = [r for r in rows if r["row_kind"] == "trial"]
    assert len(trials) == 2 * (2 + 1) and len({r["trial_id"] for r in trials}) == 6
    for t in trials:  # a row counts starts of its trial (one marker per start); rows rebuilt from Tune's logs
        # after the resume carry the run's own count, so only the bounds hold row by row
        starts = list((tmp_path / "tune" / "resume-sweep").glob(f"*-{t['trial_id']}/spt_starts/*"))
        assert 0 <= t["restarts"] <= len(starts) - 1, t
    for t in trials:  # every search trial has each of its epochs exactly once
        epochs = sorted(r["epoch"] for r in rows if r["row_kind"] == "report" and r["trial_id"] == t["trial_id"])
        assert epochs == list(range(1, t["epoch"] + 1))
    finals = [r for r in rows if r["row_kind"] == "final"]
    assert Counter((r["task"], r["label"]) for r in finals) == {
        (task, label): 1 for task in ("shapes", "count") for label in ("best", "linear")}
    assert all(r["test_acc"] is not None for r in finals)
    assert all(r["test_acc"] is None for r in rows if r["phase"] == "search")
    con = duckdb_connect(tmp_path, "resume")
    assert con.execute("SELECT count(*) - count(DISTINCT row_id) FROM results").fetchone() == (0,)
    summary = json.loads((tmp_path / "sweeps" / "resume" / "result.json").read_text())
    assert set(summary["final"]) == {"shapes", "count"} and summary["final"]["count"]["best"]["n"] == 1
