"""The Tune function trainable: ranking + trial config -> TuningPlan -> fresh backbone -> train -> report.

Every epoch reports val_acc, val_loss, train_loss, trainable_params, storage_bytes, epoch and timings
(setup_s, train_s, eval_s, checkpoint_s, wall_s, each per epoch and as `*_total` over the whole run,
restarts included) with a Tune Checkpoint holding the plan parameters and optimizer state
(`Trainer.save`, weights_only-safe) plus the run's running totals. A trial that Tune restarts (node
loss, `Tuner.restore`) resumes from its last checkpoint: it rebuilds the same plan from the same
ranking, loads the parameters and continues at the next epoch; `restarts` counts every start after the
first (`count_start`). Final runs compared at the selected SPT plan's budget (`reference_params` in the
config) report `budget_ratio`, their exact trainable parameters over SPT's.

The ranking arrives as an ObjectRef (one per task, in `rankings`, passed with `tune.with_parameters`):
trials on any node read the one object the sensitivity store put, never recomputing or copying the
full map. In the final phase the model trains on train800val200 and the test split is evaluated once,
after the last epoch; search trials never touch the test split.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import torch
from ray import tune
from ray.tune import Checkpoint

from spt_core.experiment import BackboneRef, TaskRef, build_plan, eval_batch_size
from spt_core.plan import TuningPlan
from spt_core.sensitivity import Ranking, SensitivityMap
from spt_core.train import TrainConfig

from .artifacts import write_run_files
from .memory import release_freed_memory
from .rankings import covers
from .setup_cache import prepare_cached
from .simulate import SimulatedStep, SimulatedTrainer
from .space import SPT_METHODS, STRUCTURED_OF, RankingNeeds
from .storage import Storage
from .store import RankingHandle, SensitivityRequest, get_store, load_map

TOTALS_FILE = "run_totals.json"
STARTS_DIR = "spt_starts"  # one marker per start of a trial, in its folder on the storage (see count_start)


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one phase shares (the per-trial choices are in the Tune config)."""

    phase: str  # "search" | "final"
    suite: str
    data_root: str
    backbone: BackboneRef
    train: dict[str, Any]  # TrainConfig fields; lr / weight_decay / seed come from the trial config
    img_size: int | None = None
    num_workers: int = 0
    storage_root: str | None = None  # where the sensitivity store keeps maps (for the by-key fallback)
    requests: dict[str, SensitivityRequest] = field(default_factory=dict)
    needs: RankingNeeds | None = None
    simulate: SimulatedStep | None = None  # rehearsal mode (bench/scale.py): the training step is modelled
    checkpoint_every: int = 1  # epochs between checkpoints (and always after the last)

    def __post_init__(self) -> None:
        if self.phase not in ("search", "final"):
            raise ValueError(f"phase must be 'search' or 'final', got {self.phase!r}")


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "missing"

    return {"spt_ray_version": version("spt-ray"), "torch_version": torch.__version__,
            "timm_version": version("timm"), "ray_version": ray.__version__, "optuna_version": version("optuna")}


def _threads() -> int:
    """Torch threads = whole CPUs granted to this trial (at least one); fractional trials get one."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return str(device)


def build_trial_plan(config: dict[str, Any], ranking: Ranking,
                     load_full: Callable[[], SensitivityMap]) -> tuple[TuningPlan, str]:
    """The trial's plan and where it came from: "ranking" (the object-store ranking), "layout" (baselines),
    or "full-map" for a configuration whose switch thresholds the ranking does not reach (outside the
    search space it was sized for; see spt_ray.rankings): every configuration of the space is "ranking"."""
    method = config["method"]
    kwargs = dict(budget=config.get("budget"), alpha=float(config.get("alpha") or 10.0),
                  rank=int(config.get("rank") or 8), bits=config.get("bits"))
    if method not in SPT_METHODS:
        if config.get("targets"):  # an equal-budget baseline: the driver chose its rank and targets
            kwargs.update(budget=None, targets=tuple(config["targets"]))
        return build_plan(method, ranking.layout, **kwargs), "layout"
    if covers(ranking, STRUCTURED_OF[method], kwargs["rank"], kwargs["alpha"]):
        return build_plan(method, ranking, **kwargs), "ranking"
    return build_plan(method, load_full(), **kwargs), "full-map"


def full_map_loader(context: TrialContext, handle: RankingHandle) -> Callable[[], SensitivityMap]:
    """Reads the task's full map from storage for a configuration outside the space its ranking covers;
    each read is reported to the store, which counts them per sweep (`full_map_reads`)."""
    def load_full() -> SensitivityMap:
        get_store(context.storage_root).record_full_map_read.remote(handle.key, context.needs)
        return load_map(Storage.of(context.storage_root), handle.key_fields)

    return load_full


def fetch_ranking(context: TrialContext, rankings: dict[str, ray.ObjectRef],
                  task: str) -> tuple[ray.ObjectRef, Ranking]:
    """The task's ranking's ref and the ranking (see `fetch_ranking_handle`)."""
    _, ref, ranking = fetch_ranking_handle(context, rankings, task)
    return ref, ranking


def fetch_ranking_handle(context: TrialContext, rankings: dict[str, ray.ObjectRef],
                         task: str) -> tuple[RankingHandle | None, ray.ObjectRef, Ranking]:
    """The task's ranking from the ref the driver passed: the store's reply to `get_ranking` (a sweep passes
    these, each ready before any trial of its task starts; it carries the RankingHandle) or a ranking's own
    ref (no handle). If an owner is gone (the store actor restarted after the sweep started), a fresh one
    from the store by key (it reloads the map from disk)."""
    try:
        value = ray.get(rankings[task], timeout=600)
        if isinstance(value, list):  # the store's reply: [RankingHandle]
            return value[0], value[0].ref, ray.get(value[0].ref, timeout=600).unpack()  # zero-copy views
        return None, rankings[task], value.unpack()
    except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError, ray.exceptions.ObjectFetchTimedOutError):
        if context.storage_root is None or task not in context.requests or context.needs is None:
            raise
    store = get_store(context.storage_root)
    handle = ray.get(store.get_ranking.remote(context.requests[task], context.needs))[0]
    return handle, handle.ref, ray.get(handle.ref).unpack()


def count_start() -> int:
    """How often this trial started before (0 on its first start); records this start.

    Every start leaves a marker in the trial's folder on the sweep storage. A checkpoint cannot count
    restarts: Tune restarts a trial from scratch when it failed (or its driver was killed) before a
    checkpoint was registered, and such a restart is as real as one from a checkpoint. The markers
    survive a killed driver and a lost node because they live on the storage, not on the node.
    """
    storage = tune.get_context().get_storage()
    fs, folder = storage.storage_filesystem, f"{storage.trial_fs_path}/{STARTS_DIR}"
    fs.create_dir(folder, recursive=True)
    before = [i for i in fs.get_file_info(pafs.FileSelector(folder)) if i.type == pafs.FileType.File]
    with fs.open_output_stream(f"{folder}/start-{uuid.uuid4().hex}"):
        pass
    return len(before)


def spt_trainable(config: dict[str, Any], contexts: dict[str, TrialContext],
                  rankings: dict[str, ray.ObjectRef]) -> None:
    """Train one configuration; see the module docstring. Raises on a config the plan cannot satisfy."""
    started = time.perf_counter()
    context = contexts[config.get("phase", "search")]
    restarts = count_start()
    os.environ["SPT_NO_PROGRESS"] = "1"
    torch.set_num_threads(_threads())
    task_name, method = config["task"], config["method"]
    task = TaskRef(context.suite, task_name, context.data_root, context.img_size)
    seed = int(config.get("seed", context.train.get("seed", 42)))

    handle, ranking_ref, ranking = fetch_ranking_handle(context, rankings, task_name)
    plan, plan_source = build_trial_plan(config, ranking, full_map_loader(context, handle))
    release_freed_memory()
    cfg = TrainConfig(**{**context.train, "lr": float(config["lr"]), "weight_decay": float(config["weight_decay"]),
                         "seed": seed})
    if context.simulate is not None:  # rehearsal mode (spt_ray/simulate.py): only the training step is modelled
        trainer: Any = SimulatedTrainer(context.simulate, plan, cfg.epochs, task=task_name, config=config,
                                        final=context.phase == "final")
        train_loader, eval_loader = None, "val"
    else:
        trainer, train_loader, eval_loader = prepare_cached(task, context.backbone, plan, cfg, phase=context.phase,
                                                            seed=seed, num_workers=context.num_workers)

    totals = {f"{k}_total": 0.0 for k in ("setup_s", "train_s", "eval_s", "checkpoint_s", "wall_s")}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.load(d)
            totals.update(json.loads((Path(d) / TOTALS_FILE).read_text())["totals"])
    setup_s = time.perf_counter() - started
    totals["setup_s_total"] += setup_s
    segment_start, wall_base = started, totals["wall_s_total"]
    final = context.phase == "final"
    static = {
        "task": task_name, "method": method, "epochs": cfg.epochs, "seed": seed,
        "trainable_params": plan.trainable_params, "storage_bytes": plan.storage_bytes,
        "sensitivity_key": getattr(handle, "key", None), "sensitivity_s": getattr(handle, "sensitivity_s", None),
        "ranking_object": ranking_ref.hex(), "plan_source": plan_source, "restarts": restarts,
        "budget_ratio": plan.trainable_params / config["reference_params"] if config.get("reference_params") else None,
        "ranking_bytes": ranking.nbytes + (4 * ranking.num_entries if plan_source == "full-map" else 0),
        "host": socket.gethostname(), "device": _device_name(trainer.device),
        "node_id": ray.get_runtime_context().get_node_id(), **package_versions(),
    }

    run_info = {"task": task.to_dict(), "backbone": context.backbone.to_dict(), "seed": seed, "method": method,
                "phase": context.phase, "eval_split": task.splits(context.phase)[1],
                "eval_batch_size": eval_batch_size(cfg), "amp": cfg.amp, "trainable_params": plan.trainable_params}

    def on_epoch(metrics: dict[str, float]) -> bool:
        out = {**static, "epoch": int(metrics["epoch"]), "train_loss": metrics["train_loss"],
               "train_acc": metrics["train_acc"], "train_s": metrics["train_s"], "setup_s": setup_s}
        if final:
            out["eval_s"] = 0.0
            if metrics["epoch"] >= cfg.epochs:  # the test split, once, after the last epoch
                ev = trainer.evaluate(eval_loader)
                out.update(test_acc=ev["acc"], test_loss=ev["loss"], eval_s=ev["eval_s"])
        else:
            out.update(val_acc=metrics["val_acc"], val_loss=metrics["val_loss"], eval_s=metrics["eval_s"])
        totals["train_s_total"] += out["train_s"]
        totals["eval_s_total"] += out["eval_s"]
        if out["epoch"] % context.checkpoint_every and out["epoch"] < cfg.epochs:
            out["checkpoint_s"] = 0.0
            out["wall_s"] = time.perf_counter() - segment_start
            totals["wall_s_total"] = wall_base + out["wall_s"]
            tune.report({**out, **totals})
            return False
        with tempfile.TemporaryDirectory(prefix="spt-ckpt-") as tmp:
            t0 = time.perf_counter()
            trainer.save(tmp)
            write_run_files(tmp, plan, {**run_info, "metrics": {k: out.get(k) for k in ("val_acc", "test_acc")}})
            out["checkpoint_s"] = time.perf_counter() - t0
            totals["checkpoint_s_total"] += out["checkpoint_s"]
            out["wall_s"] = time.perf_counter() - segment_start
            totals["wall_s_total"] = wall_base + out["wall_s"]
            (Path(tmp) / TOTALS_FILE).write_text(json.dumps({"totals": totals}))
            tune.report({**out, **totals}, checkpoint=Checkpoint.from_directory(tmp))
        return False

    trainer.fit(train_loader, None if final else eval_loader, on_epoch=on_epoch)
    release_freed_memory()  # what training freed, before this worker's next trial starts in a new thread


def make_trainable(contexts: dict[str, TrialContext], rankings: dict[str, ray.ObjectRef],
                   resources: dict[str, float]):
    """The trainable Tune runs: the function with its shared inputs bound and its per-trial resources.
    `contexts`: per phase (a trial's config says which); `rankings`: per task, the store's reply."""
    bound = tune.with_parameters(spt_trainable, contexts=contexts, rankings=rankings)
    return tune.with_resources(bound, resources)
