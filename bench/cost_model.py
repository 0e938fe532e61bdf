"""Cost model of a full VTAB-1k sweep (ViT-B/16) from per-step figures.

Workload (per task, 19 tasks), the VTAB recipe of spt_ray:
  * sensitivity: 16 batches of 32 images, forward + backward (one map per task);
  * search: N trials, each 100 epochs of ceil(800/64) = 13 training steps at batch 64, plus an evaluation of
    the 200 validation images (ceil(200/64) = 4 forward batches) after every epoch; optionally early-stopped
    by ASHA (grace period and reduction factor of the recipe);
  * final: the selected configuration retrained with 5 seeds on train800val200 (ceil(1000/64) = 16 steps per
    epoch, 100 epochs), then one evaluation of the task's test set (forward only).
  * baselines (optional, `baselines`): fixed runs per task in both phases, costed like a trial.

Time on K GPUs: jobs are list-scheduled in submission order on K GPUs (two trials sharing a GPU at 0.5 GPU
each run at half speed, so the GPU is the unit), phases one after the other (sensitivity, search, final), and
every phase's busy time is divided by (1 - overhead) for what happens outside training and evaluation steps
(start-up, scheduling gaps, data loading, checkpoints). GPU-hours = wall time x K (what is paid for); busy
GPU-hours = the sum of step times.

Run standalone: `python bench/cost_model.py --step-s 0.25 [--eval-s 0.08]` or `--from-json bench/results.json`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

NUM_TASKS = 19
# Test-set sizes of the VTAB-1k tasks (the standard VTAB test splits; approximate where a split was rebuilt).
VTAB_TEST_SIZES = {
    "cifar": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
    "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
    "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_dist": 15000, "dmlab": 22735, "kitti": 711,
    "dsprites_loc": 73728, "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150,
}


@dataclass
class Workload:
    tasks: int = NUM_TASKS
    epochs: int = 100
    batch: int = 64
    train_images: int = 800
    val_images: int = 200
    final_images: int = 1000
    final_seeds: int = 5
    baselines: int = 0  # fixed baseline runs per task (the VTAB recipe has 3: linear, lora, adapter)
    sensitivity_batches: int = 16
    sensitivity_batch: int = 32
    asha_grace: int = 10
    asha_reduction: float = 2.0
    test_sizes: dict[str, int] = field(default_factory=lambda: dict(VTAB_TEST_SIZES))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_images / self.batch)

    @property
    def eval_batches(self) -> int:
        return math.ceil(self.val_images / self.batch)

    @property
    def final_steps_per_epoch(self) -> int:
        return math.ceil(self.final_images / self.batch)

    def asha_epochs(self, n: int) -> list[int]:
        """Epochs each of n trials of one task runs under ASHA: rungs at grace x rf^i below `epochs`; after
        rung i, n / rf^(i+1) trials (rounded) go on; the survivors of the last rung run all epochs."""
        rungs, t = [], float(self.asha_grace)
        while t < self.epochs:
            rungs.append(int(round(t)))
            t *= self.asha_reduction
        out, alive = [], n
        for i, stop in enumerate(rungs + [self.epochs]):
            after = round(n / self.asha_reduction ** (i + 1)) if i < len(rungs) else 0
            out += [stop] * max(0, alive - after)
            alive = min(alive, after)
        return out


@dataclass
class StepFigures:
    step_s: float  # one training step at batch 64 (forward + backward + AdamW)
    eval_s: float  # one forward batch of 64, no grad
    sensitivity_s: float  # one sensitivity batch of 32
    source: str  # "gpu" or "cpu"
    label: str


def _makespan(durations: list[float], k: int) -> float:
    """List scheduling in submission order on k identical machines."""
    free = [0.0] * k
    heapq.heapify(free)
    end = 0.0
    for d in durations:
        start = heapq.heappop(free)
        heapq.heappush(free, start + d)
        end = max(end, start + d)
    return end


def estimate(fig: StepFigures, n_trials: int, k_gpus: int, *, wl: Workload | None = None, asha: bool = False,
             overhead: float = 0.10) -> dict[str, float]:
    wl = wl or Workload()
    epoch_s = wl.steps_per_epoch * fig.step_s + wl.eval_batches * fig.eval_s
    sens = [wl.sensitivity_batches * fig.sensitivity_s] * wl.tasks
    per_task_epochs = wl.asha_epochs(n_trials) if asha else [wl.epochs] * n_trials
    search: list[float] = []
    for _ in range(wl.tasks):  # the per-task searcher hands out tasks round-robin
        search += [e * epoch_s for e in per_task_epochs] + [wl.epochs * epoch_s] * wl.baselines
    tests = list(wl.test_sizes.values())[:wl.tasks] + [10000] * max(0, wl.tasks - len(wl.test_sizes))
    final = []
    for size in tests:
        run = wl.epochs * wl.final_steps_per_epoch * fig.step_s + math.ceil(size / wl.batch) * fig.eval_s
        final += [run] * (wl.final_seeds * (1 + wl.baselines))
    busy = sum(sens) + sum(search) + sum(final)
    wall = sum(_makespan(phase, k_gpus) for phase in (sens, search, final)) / (1 - overhead)
    return {"n_trials": n_trials, "k_gpus": k_gpus, "asha": asha, "busy_gpu_h": busy / 3600,
            "wall_h": wall / 3600, "gpu_h": wall * k_gpus / 3600, "search_busy_h": sum(search) / 3600,
            "final_busy_h": sum(final) / 3600, "sensitivity_busy_h": sum(sens) / 3600,
            "trial_h": wl.epochs * epoch_s / 3600}


def figures_from_results(results: dict[str, Any], gpu_step_s: float | None = None,
                         gpu_eval_s: float | None = None) -> StepFigures:
    """Per-step figures at batch 64: a GPU step time if given (eval from the measured eval/step ratio when not
    given), else the measured SPT step scaled linearly from the measured batch to 64."""
    raw = results.get("raw", {}).get("steps", {}) or {}
    env = results.get("environment", {})
    batch = raw.get("batch") or 64
    step = (raw.get("step_s_median") or {}).get("spt")
    ev = raw.get("eval_forward_s_median")
    sens_ratio = results.get("sensitivity_vs_step") or 1.0
    eval_ratio = (ev / step) if (ev and step) else 1 / 3
    on_gpu = str(env.get("device_type")) == "cuda"
    if gpu_step_s:
        eval_s = gpu_eval_s or gpu_step_s * eval_ratio
        return StepFigures(gpu_step_s, eval_s, gpu_step_s / 2 * sens_ratio, "gpu",
                           f"from a GPU figure: {gpu_step_s:.3f} s per SPT step at batch 64 (given)")
    if step is None:
        raise ValueError("no measured step time in the results; pass --gpu-step-s")
    scale = 64 / batch
    source = "gpu" if on_gpu else "cpu"
    where = env.get("device_name", "?")
    label = (f"from {'GPU' if on_gpu else 'CPU'} figures: SPT step {step:.3f} s at batch {batch} on {where}"
             + (f", scaled linearly to batch 64 (x{scale:g})" if scale != 1 else ""))
    return StepFigures(step * scale, (ev or step / 3) * scale, step * scale / 2 * sens_ratio, source, label)


def cost_table(fig: StepFigures, *, trials=(16, 32), gpus=(8, 32), overhead: float = 0.10,
               wl: Workload | None = None) -> dict[str, Any]:
    wl = wl or Workload()
    rows = [estimate(fig, n, k, wl=wl, asha=asha, overhead=overhead)
            for n in trials for k in gpus for asha in (False, True)]
    return {"source": fig.source, "label": fig.label, "figures": asdict(fig), "overhead": overhead,
            "workload": {k: v for k, v in asdict(wl).items() if k != "test_sizes"}, "rows": rows}


def format_cost_table(table: dict[str, Any]) -> str:
    head = "VTAB-1k sweep cost, " + table["label"]
    if table["source"] == "cpu":
        head = "*** FROM CPU FIGURES (no GPU figure given) *** " + head
    wl = table["workload"]
    lines = [head,
             f"  19 tasks x N trials x {wl['epochs']} epochs x {math.ceil(wl['train_images'] / wl['batch'])} steps "
             f"(+ val eval each epoch), final {wl['final_seeds']} seeds on {wl['final_images']} images + test eval, "
             f"{wl['baselines']} baseline(s)/task, overhead {table['overhead']:.0%} outside steps",
             f"  {'N':>3} {'K':>3} | {'busy GPU-h':>10} {'wall h':>8} {'GPU-h (K x wall)':>16} | "
             f"{'ASHA busy GPU-h':>15} {'ASHA wall h':>11} {'ASHA GPU-h':>10}"]
    rows = table["rows"]
    for i in range(0, len(rows), 2):
        full, asha = rows[i], rows[i + 1]
        lines.append(f"  {full['n_trials']:>3} {full['k_gpus']:>3} | {full['busy_gpu_h']:>10.1f} "
                     f"{full['wall_h']:>8.1f} {full['gpu_h']:>16.1f} | {asha['busy_gpu_h']:>15.1f} "
                     f"{asha['wall_h']:>11.1f} {asha['gpu_h']:>10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-json", help="a bench/results.json to take the step figures from")
    ap.add_argument("--step-s", type=float, help="GPU seconds per SPT training step at batch 64")
    ap.add_argument("--eval-s", type=float, help="GPU seconds per forward batch of 64 (default: from the ratio)")
    ap.add_argument("--overhead", type=float, default=0.10)
    ap.add_argument("--baselines", type=int, default=0)
    args = ap.parse_args(argv)
    results = json.load(open(args.from_json)) if args.from_json else {}
    if not results and not args.step_s:
        sys.exit("pass --from-json RESULTS or --step-s SECONDS")
    fig = figures_from_results(results, args.step_s, args.eval_s)
    print(format_cost_table(cost_table(fig, overhead=args.overhead, wl=Workload(baselines=args.baselines))))


if __name__ == "__main__":
    main()
