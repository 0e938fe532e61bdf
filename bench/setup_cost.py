"""Trial set-up time on the mini suite, without and with the per-process caches (spt_ray/setup_cache.py).

One process plays a reused trial actor: it sets up `--trials` trials in a row (as Tune's reuse_actors
hands a worker one trial after another), cycling over the tasks, each time as the trainable does
(backbone with the plan applied, trainer, both loaders) and measures each set-up. With the caches off
(SPT_SETUP_CACHE=0) every trial decodes the weights and every image again; with them on, only the first
trial of a task does. Also writes `setup_s` under `setup_cost` in bench/results.json (read-modify-write).

    python bench/setup_cost.py [--tasks shapes count] [--trials 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from spt_core.data.mini import write_mini_suite
from spt_core.experiment import BackboneRef, TaskRef, build_plan, load_backbone
from spt_core.layout import ModelLayout
from spt_core.train import TrainConfig
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import write_merged  # noqa: E402
from spt_ray import setup_cache


def measure(root: str, tasks: list[str], trials: int, cached: bool) -> list[float]:
    os.environ["SPT_SETUP_CACHE"] = "1" if cached else "0"
    setup_cache._BACKBONES.clear()
    setup_cache._DATASETS.clear()
    backbone, cfg, times = BackboneRef(), TrainConfig(epochs=1, batch_size=32), []
    plans = {t: build_plan("lora", ModelLayout.from_model(load_backbone(backbone, TaskRef("mini", t, root), seed=0)[0]),
                           rank=8) for t in tasks}  # trials build their plan from the ranking's layout
    for i in range(trials):
        task = TaskRef("mini", tasks[i % len(tasks)], root)
        t0 = time.perf_counter()
        setup_cache.prepare_cached(task, backbone, plans[task.task], cfg, phase="search", seed=42)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["shapes", "count"])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="spt-setup-") as root:
        write_mini_suite(root, seed=0, tasks=args.tasks)
        out = {}
        for name, cached in (("uncached", False), ("cached", True)):
            times = measure(root, args.tasks, args.trials, cached)
            first = len(args.tasks)  # each task's first trial fills the caches
            out[name] = {"first_s": round(statistics.fmean(times[:first]), 3),
                         "after_first_s": round(statistics.fmean(times[first:]), 3), "all_s": [round(t, 3) for t in times]}
    print(json.dumps(out, indent=1))
    write_merged(Path(args.out), {"setup_cost": out})  # read-modify-write: other benchmarks' keys stay


if __name__ == "__main__":
    main()
