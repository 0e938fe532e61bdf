"""The recipe layer: a task + a backbone + a method -> sensitivity, plan, trainer. Shared by the Ray trainable,
the CLI and the sweep scripts so that every run, local or distributed, goes through the same code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .allocate import allocate
from .backbones import RANDOM, create_backbone, default_weights, weights_sha256
from .baselines import bitfit, full_finetune, linear_probe, rank_for_budget, uniform_adapter, uniform_lora
from .data.common import make_loader as _make_loader
from .data.fgvc import FgvcDataset
from .data.fingerprint import split_fingerprint
from .data.vtab import VtabDataset, task_info
from .layout import ModelLayout
from .plan import TuningPlan
from .sensitivity import Ranking, SensitivityMap, check_sensitivity_split, compute_sensitivity
from .surgery import apply_plan
from .train import Trainer, TrainConfig, resolve_device

SUITES = ("vtab", "fgvc", "mini")
SPT_METHODS = ("spt-lora", "spt-adapter")
BASELINE_METHODS = ("linear", "full", "bitfit", "lora", "adapter")
METHODS = SPT_METHODS + BASELINE_METHODS
# (train split, evaluation split) of each phase: search selects on validation, final reports test.
PHASE_SPLITS = {
    "vtab": {"search": ("train800", "val200"), "final": ("train800val200", "test"), "sensitivity": "train800"},
    "fgvc": {"search": ("train", "val"), "final": ("trainval", "test"), "sensitivity": "train"},
}
CACHE_MAX_PIXELS = 64 * 64  # datasets with images up to this size are decoded once and kept in memory


@dataclass(frozen=True)
class TaskRef:
    """One task on disk: its suite, name and data root (the folder holding `<task>/`)."""

    suite: str
    task: str
    data_root: str
    img_size: int | None = None  # None: the task's native size (224 for VTAB/FGVC, 32 for mini)

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; use one of {', '.join(SUITES)}")
        task_info(self.task)  # raises a clear error for an unknown task

    @property
    def info(self):
        return task_info(self.task)

    @property
    def size(self) -> int:
        return self.img_size or self.info.img_size

    def splits(self, phase: str) -> tuple[str, str]:
        return PHASE_SPLITS["fgvc" if self.suite == "fgvc" else "vtab"][phase]

    @property
    def sensitivity_split(self) -> str:
        return PHASE_SPLITS["fgvc" if self.suite == "fgvc" else "vtab"]["sensitivity"]

    def dataset(self, split: str, *, train: bool) -> Dataset:
        """A split; `train` turns on the suite's augmentation (FGVC only; VTAB-1k uses none)."""
        if self.suite == "fgvc":
            return FgvcDataset(self.data_root, self.task, split, img_size=self.size, train=train)
        data = VtabDataset(self.data_root, self.task, split, img_size=self.size)
        return _cached(data) if self.size * self.size <= CACHE_MAX_PIXELS else data

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BackboneRef:
    """A timm model name and an optional local weights file (None: the embedded backbone's shipped weights)."""

    name: str = "spt-mini-vit"
    weights: str | None = None
    drop_path_rate: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cached(data: VtabDataset) -> Dataset:
    """Decode every image once (deterministic transforms only): small images train far faster from memory."""
    images, labels = zip(*(data[i] for i in range(len(data))))
    cached = TensorDataset(torch.stack(images), torch.tensor(labels, dtype=torch.int64))
    cached.num_classes = getattr(data, "num_classes", None)  # type: ignore[attr-defined]
    return cached


def num_classes(task: TaskRef) -> int:
    return task.info.num_classes


def backbone_hash(backbone: BackboneRef) -> str:
    """The backbone's identity: the weight file's content hash (the shipped file for the embedded one)."""
    path = default_weights(backbone.name) if backbone.weights is None else Path(backbone.weights)
    if backbone.weights != RANDOM and path is not None and path.is_file():
        return weights_sha256(path)
    _, info = load_backbone(backbone, None, seed=0)  # random init: the hash of the generated state
    return info["weights_sha256"]


def load_backbone(backbone: BackboneRef, task: TaskRef | None, *, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh backbone with a new head for the task, initialised from `seed` (trunc-normal, never zero)."""
    classes = num_classes(task) if task is not None else 2
    img_size = task.size if task is not None else None
    model, info = create_backbone(backbone.name, weights=backbone.weights, num_classes=classes, img_size=img_size,
                                  drop_path_rate=backbone.drop_path_rate, seed=seed)
    return model, info.to_dict()


def make_loader(task: TaskRef, split: str, *, batch_size: int, train: bool, seed: int,
                num_workers: int = 0, augment: bool | None = None) -> DataLoader:
    """Seeded loader over one split: shuffled when `train`; augmentation follows `train` unless `augment`."""
    data = task.dataset(split, train=train if augment is None else augment)
    return _make_loader(data, batch_size=batch_size, train=train, seed=seed, num_workers=num_workers)


def sensitivity_key(task: TaskRef, backbone: BackboneRef, *, split: str | None = None, num_batches: int = 16,
                    batch_size: int = 32, seed: int = 0, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a sensitivity map depends on, plus `key`, a short hash of it (the cache key).

    Only a training split may be scored (check_sensitivity_split). `data` is the split's fingerprint
    (list files' bytes, each image's size and mtime; computed when None): a changed copy of the data
    gets another key, so a stale map is never reused."""
    split = check_sensitivity_split(split, task.suite) or task.sensitivity_split
    fields = {"backbone": backbone.name, "backbone_hash": backbone_hash(backbone), "suite": task.suite,
              "task": task.task, "split": split, "num_batches": num_batches,
              "batch_size": batch_size, "seed": seed, "img_size": task.size,
              "drop_path_rate": backbone.drop_path_rate,
              "data": data or split_fingerprint(task.suite, task.data_root, task.task, split)}
    fields["key"] = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    return fields


def compute_task_sensitivity(task: TaskRef, backbone: BackboneRef, *, split: str | None = None,
                             num_batches: int = 16, batch_size: int = 32, seed: int = 0, device: str = "auto",
                             progress: bool = True) -> SensitivityMap:
    """SPT's reference setting: num_batches x batch_size train images, no augmentation, model in train mode."""
    key = sensitivity_key(task, backbone, split=split, num_batches=num_batches, batch_size=batch_size, seed=seed)
    loader = make_loader(task, key["split"], batch_size=batch_size, train=True, seed=seed, augment=False)
    model, info = load_backbone(backbone, task, seed=seed)
    dev = resolve_device(device)
    model.to(dev).train()
    torch.manual_seed(seed)
    smap = compute_sensitivity(model, loader, num_batches=num_batches, device=dev, progress=progress)
    smap.meta.update(key=key, backbone_info=info)
    return smap


def build_plan(method: str, source: SensitivityMap | Ranking | ModelLayout, *, budget: int | None = None,
               alpha: float = 10.0, rank: int = 8, bits: int | None = None,
               targets: Sequence[str] | None = None) -> TuningPlan:
    """A plan for one method. SPT methods need a map or ranking; uniform LoRA / Adapter baselines take the
    rank that best matches `budget` when one is given (equal-budget comparison)."""
    layout = source if isinstance(source, ModelLayout) else source.layout
    if method in SPT_METHODS:
        if isinstance(source, ModelLayout):
            raise ValueError(f"{method} needs a sensitivity map or ranking, not just a layout")
        if budget is None:
            raise ValueError(f"{method} needs a budget")
        return allocate(source, budget, structured=method.removeprefix("spt-"), rank=rank, alpha=alpha, bits=bits)
    if method in ("lora", "adapter"):
        kinds = tuple(targets or (("q", "v") if method == "lora" else ("fc2",)))
        r = rank_for_budget(layout, budget, method, kinds) if budget else rank
        make = uniform_lora if method == "lora" else uniform_adapter
        return make(layout, rank=r, targets=kinds, bits=bits)
    simple = {"linear": linear_probe, "full": full_finetune, "bitfit": bitfit}
    if method not in simple:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return simple[method](layout)


def eval_batch_size(cfg: TrainConfig) -> int:
    """Evaluation needs no activations for backward: twice the training batch fits."""
    return 2 * cfg.batch_size


def prepare_run(task: TaskRef, backbone: BackboneRef, plan: TuningPlan, cfg: TrainConfig, *,
                phase: str = "search", seed: int = 42, num_workers: int = 0,
                progress: bool = False) -> tuple[Trainer, DataLoader, DataLoader]:
    """A fresh backbone with `plan` applied, its trainer, and the phase's (train, eval) loaders."""
    model, _ = load_backbone(backbone, task, seed=seed)
    apply_plan(model, plan)
    train_split, eval_split = task.splits(phase)
    train, evaluate = run_loaders(task.dataset(train_split, train=True), task.dataset(eval_split, train=False), cfg,
                                  seed=seed, num_workers=num_workers)
    return Trainer(model, cfg, progress=progress), train, evaluate


def run_loaders(train_set: Dataset, eval_set: Dataset, cfg: TrainConfig, *, seed: int,
                num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """A run's (train, eval) loaders: seeded, batch sizes from `cfg`, and batches in pinned memory where the run
    trains on a GPU, so the Trainer's non-blocking copies to the device overlap the step before."""
    common = dict(seed=seed, num_workers=num_workers, pin_memory=resolve_device(cfg.device).type == "cuda")
    return (_make_loader(train_set, batch_size=cfg.batch_size, train=True, **common),
            _make_loader(eval_set, batch_size=eval_batch_size(cfg), train=False, **common))
