"""Cost model of a full VTAB-1k sweep (ViT-B/16) from per-step figures.

Workload (per task, 19 tasks), the VTAB recipe of spt_ray:
  * sensitivity: 16 batches of 32 images, forward + backward (one map per task);
  * search: N trials, each 100 epochs of ceil(800/64) = 13 training steps at batch 64, plus an evaluation of
    the 200 validation images (ceil(200/64) = 4 forward batches) after every epoch; optionally early-stopped
    by ASHA (grace period and reduction factor of the recipe);
  * final: the selected configuration retrained with 5 seeds on train800val200 (ceil(1000/64) = 16 steps per
    epoch, 100 epochs), then one evaluation of the task's test set (forward only).
  * baselines (`baselines`, the VTAB recipe's 3: linear, lora, adapter): fixed runs per task in BOTH phases
    (once each in the search, never stopped by ASHA; `final_seeds` times each in the final phase).

Time on K GPUs, as the engine schedules (spt_ray/pipeline.py): slots = min(max_concurrent, K / gpu_per_trial)
trials at once, each at min(1, K / slots) of a GPU's speed (two trials sharing a GPU at 0.5 GPU each run at
half speed); the sensitivity passes first, then one queue: a task's final runs are released when its own
search ends and go before search trials (no barrier between tasks); ASHA is asynchronous (`asha_epochs`: a
trial stops at a rung unless it is in the top 1/rf of what that rung has seen so far, in arrival order, as
Tune's AsyncHyperBandScheduler decides). Wall time is divided by (1 - overhead), the share of slot time spent
outside training and evaluation steps: measured (`--overhead-from bench/scale.json`, the rehearsal's
`scheduling_overhead_fraction`) unless given. GPU-hours = wall time x K (what is paid for); busy GPU-hours =
the sum of step times.

Run standalone: `python bench/cost_model.py --step-s 0.25 [--eval-s 0.08] [--overhead-from bench/scale.json]`
or `--from-json bench/results.json`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
    baselines: int = 3  # fixed baseline runs per task in both phases (the VTAB recipe: linear, lora, adapter)
    sensitivity_batches: int = 16
    sensitivity_batch: int = 32
    asha_grace: int = 10
    asha_reduction: float = 2.0
    gpu_per_trial: float = 0.5
    max_concurrent: int = 10**6  # the sweep's cap on trials at once (besides what the GPUs give)
    seed: int = 0  # the order of trial qualities asynchronous ASHA sees
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

    def rungs(self) -> list[int]:
        out, t = [], float(self.asha_grace)
        while t < self.epochs:
            out.append(int(round(t)))
            t *= self.asha_reduction
        return out

    def asha_epochs(self, n: int) -> list[int]:
        """Epochs each of n trials of one task runs under asynchronous ASHA: trials arrive in order with random
        qualities (seeded); at each rung a trial goes on only if its value is at least the (1 - 1/rf) quantile
        of the values that rung recorded before it (Tune's AsyncHyperBandScheduler). Early
        trials have little to compare with and go further than synchronous halving would let them."""
        rng = random.Random(self.seed)
        recorded: list[list[float]] = [[] for _ in self.rungs()]
        out = []
        for _ in range(n):
            q, epochs = rng.random(), self.epochs
            for rung, seen in zip(self.rungs(), recorded):
                stop = bool(seen) and q < _quantile(seen, 1 - 1 / self.asha_reduction)
                seen.append(q)
                if stop:
                    epochs = rung
                    break
            out.append(epochs)
        return out

    def slots(self, k_gpus: int) -> tuple[int, float]:
        """(trials at once, speed of each as a share of a GPU) on k GPUs."""
        slots = max(1, min(self.max_concurrent, int(k_gpus / self.gpu_per_trial + 1e-9)))
        return slots, min(1.0, k_gpus / slots)


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), as Tune's ASHA cuts a rung."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


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


def _pipelined_makespan(search: list[list[float]], final: list[list[float]], slots: int) -> float:
    """One queue over `slots`: search runs round-robin over the tasks; a task's final runs are released
    when its last search run ends and go first once released (spt_ray/pipeline.py)."""
    free = [0.0] * slots
    heapq.heapify(free)
    order = [(t, d) for i in range(max(map(len, search), default=0)) for t, jobs in enumerate(search)
             if i < len(jobs) for d in [jobs[i]]]
    left = [len(jobs) for jobs in search]
    search_end = [0.0] * len(search)
    released: list[tuple[float, float]] = []  # (release time, duration)
    end, pos = 0.0, 0
    for t, jobs in enumerate(search):
        if not jobs:
            released += [(0.0, d) for d in final[t]]
    while pos < len(order) or released:
        now = heapq.heappop(free)
        ready = sorted(r for r in released if r[0] <= now)
        if ready:
            job = ready[0]
            released.remove(job)
            start, d = now, job[1]
        elif pos < len(order):
            t, d = order[pos]
            pos += 1
            start = now
            left[t] -= 1
            search_end[t] = max(search_end[t], start + d)
            if left[t] == 0:
                released += [(search_end[t], fd) for fd in final[t]]
        else:  # only finals not released yet: wait for the first
            job = min(released)
            released.remove(job)
            start, d = max(now, job[0]), job[1]
        heapq.heappush(free, start + d)
        end = max(end, start + d)
    return end


def estimate(fig: StepFigures, n_trials: int, k_gpus: int, *, wl: Workload | None = None, asha: bool = False,
             overhead: float = 0.10, per_run_s: float = 0.0, per_epoch_s: float = 0.0) -> dict[str, float]:
    """`overhead`: a share of wall time outside steps; `per_run_s` / `per_epoch_s`: the engine's measured
    seconds per run (start, set-up, scheduling) and per epoch (checkpoint, report), added to every run."""
    wl = wl or Workload()
    slots, speed = wl.slots(k_gpus)
    epoch_s = wl.steps_per_epoch * fig.step_s + wl.eval_batches * fig.eval_s
    sens = [wl.sensitivity_batches * fig.sensitivity_s] * wl.tasks
    per_task_epochs = wl.asha_epochs(n_trials) if asha else [wl.epochs] * n_trials
    baseline_runs = [wl.epochs * epoch_s] * wl.baselines  # in the search: never stopped early
    search = [[e * epoch_s for e in per_task_epochs] + baseline_runs for _ in range(wl.tasks)]
    tests = list(wl.test_sizes.values())[:wl.tasks] + [10000] * max(0, wl.tasks - len(wl.test_sizes))
    final = [[wl.epochs * wl.final_steps_per_epoch * fig.step_s + math.ceil(size / wl.batch) * fig.eval_s]
             * (wl.final_seeds * (1 + wl.baselines)) for size in tests]
    busy = sum(sens) + sum(map(sum, search)) + sum(map(sum, final))
    def slot_s(d: float, epochs: int) -> float:  # a run's time in its slot
        return d / speed + per_run_s + per_epoch_s * epochs

    search_epochs = [per_task_epochs + [wl.epochs] * wl.baselines for _ in range(wl.tasks)]
    pipelined = _pipelined_makespan([[slot_s(d, e) for d, e in zip(jobs, eps)] for jobs, eps in zip(search, search_epochs)],
                                    [[slot_s(d, wl.epochs) for d in jobs] for jobs in final], slots)
    wall = (_makespan(sens, k_gpus) + pipelined) / (1 - overhead)
    return {"n_trials": n_trials, "k_gpus": k_gpus, "slots": slots, "asha": asha, "busy_gpu_h": busy / 3600,
            "wall_h": wall / 3600, "gpu_h": wall * k_gpus / 3600, "search_busy_h": sum(map(sum, search)) / 3600,
            "final_busy_h": sum(map(sum, final)) / 3600, "sensitivity_busy_h": sum(sens) / 3600,
            "trial_h": wl.epochs * epoch_s / 3600, "overhead": overhead, "per_run_s": per_run_s,
            "per_epoch_s": per_epoch_s}


def measured_overhead(path: str) -> tuple[float, float]:
    """The engine's seconds per run and per epoch outside the simulated steps, from the rehearsal
    (bench/scale.json). Seconds, not its share: the rehearsal's runs are short (a few scaled epochs), so
    the share it measures would overstate a 100-epoch run's."""
    data = json.load(open(path))
    return float(data["overhead_s_per_run"]), float(data["overhead_s_per_epoch"])


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
               wl: Workload | None = None, per_run_s: float = 0.0, per_epoch_s: float = 0.0) -> dict[str, Any]:
    wl = wl or Workload()
    rows = [estimate(fig, n, k, wl=wl, asha=asha, overhead=overhead, per_run_s=per_run_s, per_epoch_s=per_epoch_s)
            for n in trials for k in gpus for asha in (False, True)]
    return {"source": fig.source, "label": fig.label, "figures": asdict(fig), "overhead": overhead,
            "per_run_s": per_run_s, "per_epoch_s": per_epoch_s,
            "workload": {k: v for k, v in asdict(wl).items() if k != "test_sizes"}, "rows": rows}


def format_cost_table(table: dict[str, Any]) -> str:
    head = "VTAB-1k sweep cost, " + table["label"]
    if table["source"] == "cpu":
        head = "*** FROM CPU FIGURES (no GPU figure given) *** " + head
    wl = table["workload"]
    lines = [head,
             f"  19 tasks x N trials x {wl['epochs']} epochs x {math.ceil(wl['train_images'] / wl['batch'])} steps "
             f"(+ val eval each epoch), final {wl['final_seeds']} seeds on {wl['final_images']} images + test eval, "
             f"{wl['baselines']} baseline(s)/task, overhead {table['overhead']:.0%} outside steps"
             + (f" + measured {table['per_run_s']:.1f} s per run, {table['per_epoch_s']:.2f} s per epoch"
                if table.get("per_run_s") else ""),
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
    ap.add_argument("--overhead", type=float, help="share of slot time outside steps (default: measured)")
    ap.add_argument("--overhead-from", default=str(Path(__file__).with_name("scale.json")),
                    help="a bench/scale.json whose scheduling_overhead_fraction is the overhead")
    ap.add_argument("--baselines", type=int, default=3)
    ap.add_argument("--max-concurrent", type=int, default=10**6)
    args = ap.parse_args(argv)
    per_run = per_epoch = 0.0
    if args.overhead is None:
        measured = Path(args.overhead_from).is_file() and "overhead_s_per_run" in json.load(open(args.overhead_from))
        per_run, per_epoch = measured_overhead(args.overhead_from) if measured else (0.0, 0.0)
        args.overhead = 0.0 if measured else 0.10
    results = json.load(open(args.from_json)) if args.from_json else {}
    if not results and not args.step_s:
        sys.exit("pass --from-json RESULTS or --step-s SECONDS")
    fig = figures_from_results(results, args.step_s, args.eval_s)
    wl = Workload(baselines=args.baselines, max_concurrent=args.max_concurrent)
    print(format_cost_table(cost_table(fig, overhead=args.overhead, wl=wl, per_run_s=per_run, per_epoch_s=per_epoch)))


if __name__ == "__main__":
    main()
