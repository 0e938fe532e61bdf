"""Does the sensitivity map matter? SPT on the task's own map, SPT on a shuffled map, uniform LoRA: one budget.

    python bench/ablation.py                                  # 3 mini tasks, 20 epochs, 2 seeds (~12 min, 2 cores)
    python bench/ablation.py --tasks count --epochs 2 --seeds 42   # a quick look

Every method gets the same trainable budget (head excluded), recipe and seeds; train800 -> val200 (no test
image is used). The shuffled map keeps the scores' distribution but permutes them over all scored entries,
so the allocation keeps its shape (how many matrices go LoRA, how many sparse entries) and loses only the
placement. Prints a table and writes `bench/ablation.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from spt_core import allocate
from spt_core.data.mini import write_mini_suite
from spt_core.experiment import BackboneRef, TaskRef, build_plan, compute_task_sensitivity, prepare_run
from spt_core.plan import TuningPlan
from spt_core.sensitivity import SensitivityMap
from spt_core.train import TrainConfig

OUT = Path(__file__).resolve().parent / "ablation.json"
METHODS = ("spt-lora", "spt-lora, shuffled map", "uniform lora")


def shuffled(smap: SensitivityMap, seed: int) -> SensitivityMap:
    """The same scores permuted uniformly over every scored entry of every tensor."""
    names = list(smap)
    flat = torch.cat([smap[n].flatten() for n in names])
    flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))]
    parts = flat.split([smap[n].numel() for n in names])
    return SensitivityMap({n: p.view_as(smap[n]) for n, p in zip(names, parts)}, smap.layout,
                          {**smap.meta, "shuffled_seed": seed})


def plans_for(task: TaskRef, backbone: BackboneRef, budget: int, rank: int, alpha: float) -> dict[str, TuningPlan]:
    smap = compute_task_sensitivity(task, backbone, num_batches=8, batch_size=32, seed=0, progress=False)
    return {
        "spt-lora": allocate(smap, budget, structured="lora", rank=rank, alpha=alpha),
        "spt-lora, shuffled map": allocate(shuffled(smap, seed=0), budget, structured="lora", rank=rank, alpha=alpha),
        "uniform lora": build_plan("lora", smap.layout, budget=budget),
    }


def run(root: Path, tasks: list[str], *, budget: int, epochs: int, lr: float, seeds: list[int], rank: int,
        alpha: float) -> list[dict[str, Any]]:
    write_mini_suite(root, tasks=tasks)
    backbone, rows = BackboneRef(), []
    for name in tasks:
        task = TaskRef("mini", name, str(root))
        for method, plan in plans_for(task, backbone, budget, rank, alpha).items():
            for seed in seeds:
                cfg = TrainConfig(epochs=epochs, lr=lr, warmup_epochs=max(1, epochs // 10), seed=seed)
                trainer, train, val = prepare_run(task, backbone, plan, cfg, seed=seed)
                history = trainer.fit(train, val)
                rows.append({"task": name, "method": method, "seed": seed, "trainable": plan.trainable_params,
                             "val_acc": history[-1]["val_acc"]})
                print(f"{name:12s} {method:24s} seed {seed}: {100 * rows[-1]['val_acc']:.1f}% "
                      f"({rows[-1]['trainable']:,} params)", file=sys.stderr, flush=True)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Markdown: val accuracy mean ± std over seeds per task and method, and the mean over tasks."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| task | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
    means: dict[str, list[float]] = {m: [] for m in methods}
    for task in tasks:
        cells = []
        for m in methods:
            accs = [100 * r["val_acc"] for r in rows if r["task"] == task and r["method"] == m]
            means[m].append(statistics.mean(accs))
            spread = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
            params = next(r["trainable"] for r in rows if r["task"] == task and r["method"] == m)
            cells.append(f"{statistics.mean(accs):.1f}{spread} ({params / 1000:.1f}k)")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{statistics.mean(means[m]):.1f}**" for m in methods) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/data", help="mini suite folder (written if absent)")
    p.add_argument("--tasks", default="textures,count,orientation")
    p.add_argument("--budget", type=int, default=10_000, help="trainable parameters, head excluded")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seeds", default="42,44")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=10.0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = run(Path(args.root), args.tasks.split(","), budget=args.budget, epochs=args.epochs, lr=args.lr,
               seeds=[int(s) for s in args.seeds.split(",")], rank=args.rank, alpha=args.alpha)
    print(format_rows(rows))
    OUT.write_text(json.dumps({"args": vars(args), "rows": rows, "wall_s": round(time.perf_counter() - start, 1)},
                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
