"""Measured: warm-started multivariate TPE vs cold TPE vs random search at equal trial counts on the mini
suite, and the low-bit front (val accuracy vs KB per task, bits searched). Writes bench/search_study.json and
bench/search_study.png.

    python bench/search_study.py --quick                  # the reduced CPU version (3 tasks, 2 seeds, 6 trials)
    python bench/search_study.py --out DIR --workers 14   # all 8 tasks, 3 seeds, 8 trials (a GPU machine)
    python bench/search_study.py --report bench/search_study.json   # summary + figure from a run's records

Each arm is the study `PerTaskSearcher` builds for a task (`spt_ray.studies.task_study` with `make_sampler`,
the per-task seed, and for "warm-tpe" the paper's configurations enqueued), driven by Optuna's ask / tell
(what OptunaSearch does inside Tune) with its trials trained in this process on train800 -> val200 by
spt_core, one (arm, task, seed) job per worker process. No Ray: trials run one after another inside a job,
so the constant liar is not exercised here (tests/test_search_samplers.py covers it). The front arm is the
multi-objective study over (val accuracy, storage bytes) with bits in {float, 2, 1}; its front is
`spt_ray.selection.pareto_front`, computed by `--report` (which needs the package's Ray install).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, TimeoutError, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("warm-tpe", "warm-half-tpe", "cold-tpe", "random")  # warm-half: half the trials warm (the first default)
FRONT = "front"  # the multi-objective arm
ALL_TASKS = ("shapes", "textures", "cells", "landcover", "count", "location", "orientation", "distance")


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One study (an arm on a task with a sweep seed) to `trials` trials; every trial's record."""
    import optuna

    from spt_core.experiment import BackboneRef, TaskRef, build_plan, compute_task_sensitivity, prepare_run
    from spt_core.train import TrainConfig
    from spt_ray.space import SearchSpace
    from spt_ray.studies import make_sampler, task_seed, task_study, warm_start_limit
    from spt_ray.suites import MINI

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = TaskRef("mini", job["task"], job["data_root"])
    backbone = BackboneRef(**MINI["backbone"])
    smap = compute_task_sensitivity(task, backbone, num_batches=MINI["sensitivity"]["num_batches"],
                                    batch_size=MINI["sensitivity"]["batch_size"], progress=False)
    arm, n = job["arm"], job["trials"]
    space_dict = {**MINI["space"], **({"bits": [None, 2, 1]} if arm == FRONT else {})}
    space = SearchSpace.from_dict(space_dict).resolve(smap.layout.total_params)
    directions = ["maximize", "minimize"] if arm == FRONT else ["maximize"]
    sampler = make_sampler("random" if arm == "random" else "tpe", task_seed(job["seed"], job["task"]), n)
    warm = {"warm-tpe": warm_start_limit(n), FRONT: warm_start_limit(n), "warm-half-tpe": max(1, n // 2)}.get(arm, 0)
    study = task_study(None, f"{arm}/{job['task']}", "", space, directions, sampler, warm_starts=warm)
    records = []
    for number in range(n):
        trial = study.ask()
        cfg = space(trial)
        plan = build_plan(cfg["method"], smap, budget=cfg["budget"], alpha=cfg["alpha"], rank=cfg["rank"],
                          bits=cfg["bits"])
        train = TrainConfig(**{**MINI["train"], **job["train"], "lr": cfg["lr"], "weight_decay": cfg["weight_decay"]})
        t0 = time.perf_counter()
        trainer, train_loader, val_loader = prepare_run(task, backbone, plan, train, phase="search")
        val = trainer.fit(train_loader, val_loader)[-1]["val_acc"]
        study.tell(trial, [val, plan.storage_bytes] if arm == FRONT else val)
        records.append({"arm": arm, "task": job["task"], "seed": job["seed"], "number": number, **cfg,
                        "val_acc": val, "trainable_params": plan.trainable_params,
                        "storage_bytes": plan.storage_bytes, "warm_start": number < warm,
                        "train_s": time.perf_counter() - t0})
    return records


def run(args: argparse.Namespace) -> dict[str, Any]:
    from spt_core.data.mini import write_mini_suite

    data_root = Path(args.data_root or tempfile.mkdtemp(prefix="spt-mini-"))
    missing = [t for t in args.tasks if not (data_root / t).exists()]
    if missing:
        write_mini_suite(data_root, tasks=missing)
    train = {"epochs": args.epochs, "warmup_epochs": min(1, args.epochs - 1)}
    jobs = [{"arm": arm, "task": t, "seed": s, "trials": args.trials, "data_root": str(data_root), "train": train}
            for arm in args.arms for t in args.tasks for s in range(args.seeds)]
    jobs += [{"arm": FRONT, "task": t, "seed": 0, "trials": args.front_trials, "data_root": str(data_root),
              "train": train} for t in args.tasks[:args.front_tasks]]
    # the long front jobs first, then (seed, task) blocks of every arm: a run cut short stays balanced
    jobs.sort(key=lambda j: (j["arm"] != FRONT, j["seed"], j["task"], j["arm"]))
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(run_job, job) for job in jobs]
    try:
        for fut in as_completed(futures, timeout=args.budget_s):
            records += fut.result()
    except TimeoutError:
        print(f"stopped after {args.budget_s}s: {sum(f.done() for f in futures)} of {len(jobs)} jobs done")
    pool.shutdown(wait=False, cancel_futures=True)
    import torch

    return {"settings": {"tasks": list(args.tasks), "seeds": args.seeds, "trials": args.trials,
                         "front_tasks": list(args.tasks[:args.front_tasks]), "front_trials": args.front_trials,
                         "epochs": args.epochs, "workers": args.workers,
                         "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                         "cpus": os.cpu_count(), "wall_s": time.perf_counter() - t0,
                         "jobs": len(jobs), "jobs_done": len({(r["arm"], r["task"], r["seed"]) for r in records})},
            "records": records}


# ---- the report -------------------------------------------------------------------------------------
def best_so_far(records: list[dict[str, Any]], n: int) -> float:
    return max(r["val_acc"] for r in sorted(records, key=lambda r: r["number"])[:n])


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Per arm: mean best val after n trials over tasks and seeds (and the spread of the per-seed means);
    per task: the front arm's Pareto front (selection.pareto_front over val_acc and storage_bytes)."""
    import pyarrow as pa

    from spt_ray.results import SCHEMA
    from spt_ray.selection import pareto_front

    recs, settings = data["records"], data["settings"]
    arms = [a for a in ARMS if any(r["arm"] == a for r in recs)]
    done = {(r["task"], r["seed"], r["arm"]) for r in recs}
    complete = {(t, s) for t, s, _ in done if all((t, s, arm) in done for arm in arms)}  # equal trials per arm
    curves: dict[str, Any] = {"studies_compared": sorted(complete)}
    for arm in arms:
        mine = [r for r in recs if r["arm"] == arm and (r["task"], r["seed"]) in complete]
        studies = {(r["task"], r["seed"]) for r in mine}
        curve, spread = [], []
        for n in range(1, settings["trials"] + 1):
            per_study = {k: best_so_far([r for r in mine if (r["task"], r["seed"]) == k], n) for k in studies}
            curve.append(statistics.fmean(per_study.values()))
            per_seed = [statistics.fmean(v for (t, s), v in per_study.items() if s == seed)
                        for seed in sorted({s for _, s in studies})]
            spread.append(statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0)
        curves[arm] = {"mean_best_val": curve, "seed_std": spread,
                       "per_task_final": {t: statistics.fmean(best_so_far([r for r in mine if (r["task"], r["seed"])
                                                                             == (t, s)], settings["trials"])
                                                               for s in sorted({s for tt, s in studies if tt == t}))
                                          for t in sorted({t for t, _ in studies})}}
    rows = [{"sweep": "study", "task": r["task"], "phase": "search", "row_kind": "trial", "status": "completed",
             "searched": True, "trial_id": f"{r['task']}-{r['number']}", "epoch": 1, "epochs": 1,
             **{k: r[k] for k in ("method", "budget", "alpha", "rank", "lr", "weight_decay", "bits", "val_acc",
                                  "trainable_params", "storage_bytes")}} for r in recs if r["arm"] == FRONT]
    fronts = pareto_front(pa.Table.from_pylist(rows, schema=SCHEMA), "storage_bytes") if rows else {}
    return {"curves": curves, "fronts": {t: [{k: r[k] for k in ("method", "bits", "budget", "rank", "val_acc",
                                                                 "trainable_params", "storage_bytes")} for r in f]
                                         for t, f in fronts.items()}}


def figure(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    s, summary = data["settings"], data["summary"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(1, s["trials"] + 1)
    for arm, c in ((a, summary["curves"][a]) for a in ARMS if a in summary["curves"]):
        mean, std = [100 * v for v in c["mean_best_val"]], [100 * v for v in c["seed_std"]]
        ax.errorbar(xs, mean, yerr=std, label=arm, capsize=3, marker="o", ms=4)
    ax.set_xlabel("trials per task")
    ax.set_ylabel("best val accuracy so far (%)")
    n = len(summary["curves"]["studies_compared"])
    ax.set_title(f"mini: {n} (task, seed) studies per arm, {s['epochs']} epochs (mean; bars: std over seeds)",
                 fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    markers = {None: "o", 2: "s", 1: "^"}
    for task, front in summary["fronts"].items():
        pts = sorted(front, key=lambda r: r["storage_bytes"])
        line = bx.plot([r["storage_bytes"] / 1024 for r in pts], [100 * r["val_acc"] for r in pts], lw=1,
                       label=task)[0]
        for r in pts:
            bx.scatter(r["storage_bytes"] / 1024, 100 * r["val_acc"], marker=markers[r["bits"]], color=line.get_color())
    bx.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    bx.xaxis.set_major_formatter(plain)
    bx.xaxis.set_minor_formatter(plain)
    bx.set_xlabel("storage of the task delta (KB); o float, s 2-bit, ^ 1-bit")
    bx.set_ylabel("val accuracy (%)")
    bx.set_title("low-bit Pareto front per task (val)", fontsize=9)
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def dumps(data: dict[str, Any]) -> str:
    """JSON with one trial record per line (readable diffs, a third of the indented size)."""
    head = json.dumps({k: v for k, v in data.items() if k != "records"}, indent=1)[:-2]
    records = ",\n".join(json.dumps(r, separators=(",", ":")) for r in data.get("records", []))
    return f'{head},\n "records": [\n{records}\n]\n}}\n'


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 tasks, 2 seeds, 6 trials, 2 epochs, front on 3 tasks")
    p.add_argument("--tasks", default=",".join(ALL_TASKS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--front-tasks", type=int, default=3)
    p.add_argument("--front-trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data-root")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    p.add_argument("--budget-s", type=float, default=None, help="stop waiting after this long; keep what finished")
    p.add_argument("--out", default=str(ROOT / "bench"))
    p.add_argument("--report", help="summarize a run's JSON (records) and draw its figure; runs nothing")
    p.add_argument("--merge", action="append", help="with --report: add the records of another run's JSON")
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.arms = [a for a in args.arms.split(",") if a]
    if args.quick:
        args.tasks, args.seeds, args.trials, args.epochs = ["textures", "cells", "count"], 2, 6, 2
        args.front_trials = 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        data = json.loads(Path(args.report).read_text())
        for extra in args.merge or []:  # more arms of the same settings, run separately
            more = json.loads(Path(extra).read_text())
            data["records"] += more["records"]
            data["settings"].setdefault("merged", []).append(more["settings"])
    else:
        data = run(args)
    if args.report:
        data["summary"] = summarize(data)
        figure(data, out / "search_study.png")
    (out / "search_study.json").write_text(dumps(data))
    print(json.dumps(data.get("summary", data["settings"]), indent=1)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
