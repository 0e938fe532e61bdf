"""The rehearsal (bench/scale.py) as a small smoke on a local multi-node Ray, and the cost model's scheduling
(bench/cost_model.py) against references: Tune's own asynchronous-ASHA bracket, and a brute-force timeline."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from cost_model import StepFigures, Workload, _pipelined_makespan, estimate  # noqa: E402


def test_asynchronous_asha_stops_where_tunes_bracket_stops():
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    class T:
        def __init__(self, i):
            self.trial_id = str(i)

    for grace, epochs, n in ((10, 100, 32), (1, 3, 7), (5, 40, 50)):
        wl = Workload(epochs=epochs, asha_grace=grace, seed=4)
        rng = random.Random(wl.seed)
        bracket, expected = _Bracket(grace, epochs, 2.0, 0, stop_last_trials=False), []
        for i in range(n):  # trials in arrival order, each reporting its (constant) quality every epoch
            q, ran = rng.random(), epochs
            for epoch in range(1, epochs + 1):
                if bracket.on_result(T(i), epoch, q) == TrialScheduler.STOP:
                    ran = epoch
                    break
            expected.append(ran)
        assert wl.asha_epochs(n) == expected
        assert expected[0] == epochs  # the first trial has nothing to compare with: asynchronous, not halving


def test_a_tasks_final_runs_start_when_its_own_search_ends():
    # two slots; task 0 searches 1+1 s, task 1 searches 5+5 s; finals of 2 s each
    end = _pipelined_makespan([[1.0, 1.0], [5.0, 5.0]], [[2.0], [2.0]], slots=2)
    # slot A: s0a 0-1, s0b 1-2, task 0's search ended -> its final first 2-4 (task 1 still searching), s1b 4-9;
    # slot B: s1a 0-5, then nothing is ready until task 1's search ends at 9: its final 9-11
    assert end == pytest.approx(11.0)


def test_concurrency_cap_and_sharing_speed():
    wl = Workload(max_concurrent=8)
    assert wl.slots(16) == (8, 1.0)  # capped: each trial on its own GPU, full speed
    assert Workload().slots(16) == (32, 0.5)  # 0.5 GPU per trial: two per GPU, half speed each
    fig = StepFigures(0.15, 0.05, 0.05, "gpu", "test")
    one = estimate(fig, 8, 16, wl=Workload(baselines=0), overhead=0.0)
    three = estimate(fig, 8, 16, wl=Workload(baselines=3), overhead=0.0)
    per_run = 100 * 13 * 0.15 + 4 * 100 * 0.05  # a search baseline: every epoch, never stopped
    assert three["search_busy_h"] - one["search_busy_h"] == pytest.approx(19 * 3 * per_run / 3600)
    assert three["final_busy_h"] > 3.9 * one["final_busy_h"]  # best + 3 baselines, 5 seeds each


@pytest.mark.slow
def test_rehearsal_smoke_writes_every_figure(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--tasks", "2", "--trials", "3",
                           "--epochs", "2", "--grace", "1", "--seeds", "1", "--baselines", "linear", "--nodes", "2",
                           "--gpus", "2", "--scale", "0.002", "--checkpoint-every", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    for key in ("scheduling_overhead_fraction", "idle_slot_fraction_phase_edges", "head_peak_rss_gb",
                "object_store_bytes_per_trial", "full_map_reads", "parquet_files", "driver_cpu_s", "wall_s",
                "scale_factor"):
        assert key in fig, key
    shape = fig["shape"]
    assert shape["search_runs"] == 2 * (3 + 1) and shape["final_runs"] == 2 * 2  # (best + linear) x 1 seed
    assert fig["full_map_reads"] == 0 and 0 <= fig["scheduling_overhead_fraction"] <= 1
    assert fig["parquet_files"] <= 2 * 2 + 1  # one per task and phase (+ at most one part)
    assert shape["map_entries"] > 85e6
    held = fig["storage"]["checkpoints_per_trial"]  # 2-epoch runs checkpoint twice; the sweep keeps the last
    assert held["trials"] >= 2 and held["max"] == 1
    assert fig["storage"]["bytes_by_folder"]["tune"] > 0 and fig["storage"]["bytes_by_folder"]["results"] > 0
    parts = fig["head_peak_rss_gb_by_part"]  # each part's own peak: together at least the peak of the whole
    assert {"driver", "store", "ray_core"} <= set(parts) and sum(parts.values()) >= fig["head_peak_rss_gb"] - 1e-3
