"""Full-scale rehearsal of a VTAB-1k sweep on logical GPUs: the real engine, only the training step simulated.

    python bench/scale.py                      # the VTAB-1k recipe's shape (19 tasks x 32 trials, 5 seeds, ...)
    python bench/scale.py --tasks 3 --trials 4 --epochs 4 --seeds 2 --nodes 2 --gpus 4   # a smoke

What is real: a local multi-node Ray (`ray.cluster_utils.Cluster`, the GPUs declared, logical), the
sensitivity store actor serving rankings derived from ViT-B/16-sized maps (85.8M entries, synthetic
log-normal scores persisted as the store persists maps, so the store loads them from disk: no weights, no
sensitivity pass; the backbone is a file of random ViT-B/16 weights, which only the pre-sweep check
loads), per-task Optuna studies, per-task ASHA, the per-task pipeline (spt_ray/pipeline.py),
plans allocated from the rankings, checkpoints of each plan's true parameter count, Parquet rows and
compaction, the final phase with the VTAB recipe's seeds and baselines. What is simulated: each epoch
sleeps a modelled GPU time (spt_ray/simulate.py), from the cost model's step figures for ViT-B/16 at batch
64 (`--step-s`, `--eval-s`), doubled for a trial holding half a GPU (two trials share it), times
`--scale` (the stated factor that makes the run fit in minutes here).

Writes bench/scale.json: scheduling_overhead_fraction (slot time of the Tune run not spent in simulated
steps), idle_slot_fraction_phase_edges (idle slot time between the first and the last task's end of
search, where a global barrier used to idle slots), head_peak_rss_gb (driver + head node's Ray processes,
sampled; by part in head_peak_rss_gb_by_part), object_store_bytes_per_trial (peak object store use over
trials run), full_map_reads, parquet_files, storage (bytes by folder, checkpoints held per trial), driver_cpu_s,
wall_s, scale_factor, and the shape that ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from cost_model import Workload  # noqa: E402

BACKBONE = "vit_base_patch16_224"


def synthetic_map(layout: Any, seed: int) -> Any:
    """Log-normal scores of every scored tensor of `layout` (heavy-tailed like squared gradients)."""
    from spt_core.sensitivity import SensitivityMap

    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
    for t in layout.scored:
        shapes.setdefault(t.param, []).append((t.row_start, tuple(t.shape)))
    scores = {p: torch.cat([torch.exp(1.5 * torch.randn(s, generator=g)) for _, s in sorted(parts)], 0)
              for p, parts in shapes.items()}
    return SensitivityMap(scores, layout, {"synthetic": True, "seed": seed})


def write_data(root: Path, tasks: list[str]) -> None:
    """A VTAB-1k layout with one tiny image per split (only the sensitivity key's fingerprint reads it)."""
    from PIL import Image

    for task in tasks:
        (root / task / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / task / "images" / "0.png")
        for split in ("train800", "val200", "train800val200", "test"):
            (root / task / f"{split}.txt").write_text("images/0.png 0\n")


def write_weights(path: Path) -> str:
    """A ViT-B/16 state dict of random values: the backbone's identity is then its file's sha256 (what a
    real weights file gives). Trials never load it (simulated); the pre-sweep check builds it once."""
    import timm
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in timm.create_model(BACKBONE, pretrained=False).state_dict().items()},
              str(path))
    return str(path)


def seed_store(storage: str, spec: Any) -> float:
    """Persist a synthetic map under each task's real sensitivity key (the store then loads, never computes)."""
    import timm

    from spt_core.experiment import TaskRef
    from spt_core.layout import ModelLayout
    from spt_ray.storage import Storage
    from spt_ray.store import SensitivityRequest, persist_map

    with torch.device("meta"):
        layout = ModelLayout.from_model(timm.create_model(BACKBONE, pretrained=False))
    smap = synthetic_map(layout, seed=0)
    for task in spec.tasks:
        request = SensitivityRequest(TaskRef(spec.suite, task, spec.data_root, spec.img_size), spec.backbone,
                                     split=spec.sensitivity.split, num_batches=spec.sensitivity.num_batches,
                                     batch_size=spec.sensitivity.batch_size, seed=spec.sensitivity.seed)
        persist_map(Storage.of(storage), request.key_fields(), smap)
    return float(smap.num_entries)


def process_group(proc: psutil.Process, driver_pid: int) -> str:
    """Which part of the head node a process is: the driver, the store actor, Ray's dashboard, Ray's core."""
    if proc.pid == driver_pid:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline()).lower()
    except psutil.Error:
        return "other"
    for needle, group in (("sensitivitystore", "store"), ("dashboard", "dashboard"), ("gcs_server", "ray_core"),
                          ("raylet", "ray_core")):
        if needle in cmd:
            return group
    return "other"


class Sampler(threading.Thread):
    """Peak RSS of the driver and the head node's Ray processes (in all and by part), peak object store use,
    every 0.5 s."""

    def __init__(self, head: Any):
        super().__init__(daemon=True)
        self.head, self.stop, self.peak_rss, self.peak_store = head, threading.Event(), 0, 0.0
        self.peak_by_group: dict[str, int] = {}

    def head_processes(self) -> list[psutil.Process]:
        procs = [psutil.Process()]
        for infos in list(self.head.all_processes.values()):  # Ray adds processes while it starts
            for info in list(infos):
                try:
                    p = psutil.Process(info.process.pid)
                    procs += [p, *p.children(recursive=True)]
                except psutil.Error:
                    pass
        return procs

    def run(self) -> None:
        import ray

        driver = os.getpid()
        while not self.stop.wait(0.5):
            by_group: dict[str, int] = {}
            try:
                procs = {p.pid: p for p in self.head_processes()}.values()
            except RuntimeError:  # the table changed while read: sample again
                continue
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                group = process_group(p, driver)
                by_group[group] = by_group.get(group, 0) + rss
            self.peak_rss = max(self.peak_rss, sum(by_group.values()))
            for group, rss in by_group.items():
                self.peak_by_group[group] = max(self.peak_by_group.get(group, 0), rss)
            try:
                total, free = ray.cluster_resources(), ray.available_resources()
                self.peak_store = max(self.peak_store, total.get("object_store_memory", 0)
                                      - free.get("object_store_memory", 0))
            except Exception:  # noqa: BLE001 - Ray shutting down
                pass


def _median(values: list[float | None]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    return round(vals[len(vals) // 2], 3) if vals else None


def footprint(storage: Path) -> dict[str, Any]:
    """Bytes under each top-level folder of the sweep's storage, and the checkpoints each Tune trial folder
    holds at the end (a sweep keeps one: CheckpointConfig(num_to_keep=1))."""
    by_folder = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                 for d in sorted(storage.iterdir()) if d.is_dir()}
    held = [len(list(t.glob("checkpoint_*"))) for t in storage.glob("tune/*/*") if t.is_dir()]
    held = [n for n in held if n]
    return {"bytes_by_folder": by_folder, "bytes": sum(by_folder.values()),
            "checkpoints_per_trial": {"max": max(held, default=0), "median": _median(held), "trials": len(held)}}


def idle_at_edges(rows: list[dict[str, Any]], slots: int) -> float:
    """Idle slot fraction between the first and the last task's end of search (trial spans from rows)."""
    spans = [(r["created_at"].timestamp() - r["wall_s"], r["created_at"].timestamp(), r)
             for r in rows if r["row_kind"] in ("trial", "final") and r["wall_s"]]
    ends = {}
    for start, end, r in spans:
        if r["phase"] == "search":
            ends[r["task"]] = max(ends.get(r["task"], 0.0), end)
    if len(ends) < 2:
        return 0.0
    lo, hi = min(ends.values()), max(ends.values())
    if hi <= lo:
        return 0.0
    busy = sum(max(0.0, min(end, hi) - max(start, lo)) for start, end, _ in spans)
    return max(0.0, 1.0 - busy / (slots * (hi - lo)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from spt_ray.suites import RECIPES

    vtab = RECIPES["vtab"]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=19)
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--baselines", nargs="*", default=list(vtab["baselines"]))
    ap.add_argument("--epochs", type=int, default=vtab["train"]["epochs"])
    ap.add_argument("--grace", type=int, default=vtab["scheduler"]["grace_period"])
    ap.add_argument("--checkpoint-every", type=int, default=vtab["checkpoint_every"], help="epochs between checkpoints")
    ap.add_argument("--gpus", type=int, default=16)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--gpu-per-trial", type=float, default=0.5)
    ap.add_argument("--max-concurrent", type=int, default=0, help="0: every slot the GPUs give")
    ap.add_argument("--step-s", type=float, default=0.15, help="modelled GPU s per training step at batch 64")
    ap.add_argument("--eval-s", type=float, default=0.05, help="modelled GPU s per forward batch of 64")
    ap.add_argument("--scale", type=float, default=0.01, help="real seconds slept per modelled second")
    ap.add_argument("--out", default=str(ROOT / "bench" / "scale.json"))
    ap.add_argument("--keep", metavar="DIR", help="run in DIR and keep its storage (Parquet rows, Tune folders)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("SPT_NO_PROGRESS", "1")
    # The logical nodes share this machine's cores: a raylet prestarting one idle worker per declared CPU (34
    # here, each importing Ray) would spend the rehearsal's CPU on processes no trial uses.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    import ray
    from ray.cluster_utils import Cluster

    from spt_ray import SweepSpec, read_results, run_sweep
    from spt_ray.simulate import SimulatedStep

    slots = int(args.gpus / args.gpu_per_trial)
    wl = Workload(epochs=args.epochs)
    share = 1 / args.gpu_per_trial if args.gpu_per_trial < 1 else 1.0  # trials sharing a GPU run at its share
    sim = SimulatedStep(search_epoch_s=wl.steps_per_epoch * args.step_s * share,
                        final_epoch_s=wl.final_steps_per_epoch * args.step_s * share,
                        val_s=wl.eval_batches * args.eval_s * share, test_s=math.ceil(10000 / 64) * args.eval_s * share,
                        scale=args.scale)
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="spt-scale-")) as tmp:
        data, storage = Path(tmp) / "data", str(Path(tmp) / "storage")
        tasks = list(vtab["tasks"])[:args.tasks]
        write_data(data, tasks)
        weights = write_weights(Path(tmp) / "vit_b16_random.safetensors")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
        per_node = args.gpus // args.nodes
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=max(4, int(per_node / args.gpu_per_trial)), num_gpus=per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)  # the CLI's default
        spec = SweepSpec.from_dict({
            "name": "scale", "suite": "vtab", "tasks": tasks, "data_root": str(data), "storage": storage,
            "backbone": {"name": BACKBONE, "weights": weights}, "space": vtab["space"],
            "num_samples": args.trials, "baselines": args.baselines, "final_seeds": list(range(args.seeds)),
            "train": {**vtab["train"], "epochs": args.epochs},
            "scheduler": {"kind": "asha", "grace_period": min(args.grace, args.epochs)},
            "checkpoint_every": min(args.checkpoint_every, args.epochs),
            "resources": {"cpu": 0.5, "gpu": args.gpu_per_trial},
            "max_concurrent": args.max_concurrent or slots})
        t0 = time.perf_counter()
        entries = seed_store(storage, spec)
        seed_s = time.perf_counter() - t0
        sampler = Sampler(cluster.head_node)
        sampler.start()
        cpu0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        result = run_sweep(spec, simulate=sim)
        wall = time.perf_counter() - w0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        sampler.stop.set()
        rows = read_results(storage, "scale").to_pylist()
        epochs = [r for r in rows if r["row_kind"] == "report"]
        runs = [r for r in rows if r["row_kind"] in ("trial", "final")]
        used_slots = min(slots, spec.max_concurrent)
        tune_s = result.overhead.get("tune_s") or wall
        simulated = sum((r["train_s"] or 0) + (r["eval_s"] or 0) for r in epochs)
        per_epoch = sum(r["checkpoint_s"] or 0 for r in epochs) / max(1, len(epochs))  # checkpoint + report
        per_run = (tune_s * used_slots - simulated - per_epoch * len(epochs)) / max(1, len(runs))
        out = {
            "scheduling_overhead_fraction": round(1 - simulated / (tune_s * used_slots), 4),
            "idle_slot_fraction_phase_edges": round(idle_at_edges(rows, used_slots), 4),
            "head_peak_rss_gb": round(sampler.peak_rss / 2**30, 3),
            "head_peak_rss_gb_by_part": {g: round(v / 2**30, 3) for g, v in sorted(sampler.peak_by_group.items())},
            "object_store_bytes_per_trial": int(sampler.peak_store / max(1, len(runs))),
            "full_map_reads": result.store_stats.get("full_map_reads"),
            "parquet_files": len(list(Path(storage, "results").rglob("*.parquet"))),
            "storage": footprint(Path(storage)),
            "driver_cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
            "wall_s": round(wall, 1), "tune_s": round(tune_s, 1), "scale_factor": args.scale,
            "sweep_overhead_share": result.overhead.get("share"),
            "overhead_s_per_run": round(per_run, 2), "overhead_s_per_epoch": round(per_epoch, 3),  # the cost model's
            # where a run's own time goes (medians over runs): set-up, checkpoints+reports, and its whole span
            "run_setup_s_median": _median([r["setup_s"] for r in runs]),
            "run_checkpoint_s_median": _median([r["checkpoint_s"] for r in runs]),
            "run_wall_s_median": _median([r["wall_s"] for r in runs]),
            "run_simulated_s_median": _median([(r["train_s"] or 0) + (r["eval_s"] or 0) for r in runs]),
            "shape": {"tasks": len(tasks), "trials": args.trials, "final_seeds": args.seeds,
                      "baselines": args.baselines, "epochs": args.epochs, "grace_period": spec.scheduler.grace_period,
                      "checkpoint_every": spec.checkpoint_every,
                      "gpus": args.gpus, "nodes": args.nodes, "gpu_per_trial": args.gpu_per_trial, "slots": used_slots,
                      "map_entries": entries, "search_runs": sum(r["phase"] == "search" for r in runs),
                      "final_runs": sum(r["phase"] == "final" for r in runs), "epochs_reported": len(epochs)},
            "modelled": {"step_s": args.step_s, "eval_s": args.eval_s, **sim.__dict__}, "seed_maps_s": round(seed_s, 1),
        }
        ray.shutdown()
        cluster.shutdown()
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
