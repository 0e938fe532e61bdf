"""A trial's set-up (backbone, data, plan) in a fraction of the time after the first trial in a process.

`spt_core.experiment.prepare_run` builds everything from files: it decodes the backbone's weights file
into a fresh model and decodes every image of both splits. Tune reuses a trial's actor for the next
trial (`reuse_actors`, the spec's default), so a worker process runs many trials; this module keeps,
per process, what the next trial would rebuild identically:

* the backbone as loaded (weights applied, the task's head initialised from the seed), before any plan
  is applied, keyed by its name, the weights file's identity (path, size, mtime, which is what its
  sha256 is cached by), classes, image size, drop path and seed; every trial gets a deep copy (the
  plan then modifies the copy only);
* each split's decoded dataset, keyed by the task, split, augmentation and the split's fingerprint
  (its list file's bytes, each image's size and mtime: a changed copy of the data is decoded again).

Both caches hold a few entries (least recently used goes): a worker serves the tasks it is handed. The
results are the same tensors `prepare_run` builds (same seed, same files); SPT_SETUP_CACHE=0 turns the
caches off (to measure what they save).
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from spt_core.backbones import RANDOM, default_weights
from spt_core.data.fingerprint import split_fingerprint
from spt_core.experiment import BackboneRef, TaskRef, load_backbone, run_loaders
from spt_core.plan import TuningPlan
from spt_core.surgery import apply_plan
from spt_core.train import Trainer, TrainConfig

MAX_ENTRIES = 4
_BACKBONES: OrderedDict[tuple, nn.Module] = OrderedDict()
_DATASETS: OrderedDict[tuple, Dataset] = OrderedDict()
STATS = {"backbone_hits": 0, "backbone_misses": 0, "dataset_hits": 0, "dataset_misses": 0}


def enabled() -> bool:
    return os.environ.get("SPT_SETUP_CACHE", "1") != "0"


def _remember(cache: OrderedDict, key: tuple, value: Any) -> Any:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > MAX_ENTRIES:
        cache.popitem(last=False)
    return value


def _weights_identity(backbone: BackboneRef) -> tuple:
    if backbone.weights == RANDOM:
        return (RANDOM,)
    path = default_weights(backbone.name) if backbone.weights is None else Path(backbone.weights)
    if path is None or not path.is_file():
        return (str(path),)  # load_backbone raises its own error
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def backbone_for(backbone: BackboneRef, task: TaskRef, seed: int) -> nn.Module:
    """A fresh backbone as `load_backbone` builds it, from the process's cache when it holds one."""
    if not enabled():
        return load_backbone(backbone, task, seed=seed)[0]
    key = (backbone.name, _weights_identity(backbone), task.suite, task.task, task.data_root, task.size,
           backbone.drop_path_rate, seed)
    model = _BACKBONES.get(key)
    STATS["backbone_hits" if model is not None else "backbone_misses"] += 1
    if model is None:
        model = _remember(_BACKBONES, key, load_backbone(backbone, task, seed=seed)[0])
    _BACKBONES.move_to_end(key)
    return copy.deepcopy(model)


def dataset_for(task: TaskRef, split: str, *, train: bool) -> Dataset:
    """The decoded split (`TaskRef.dataset`), from the process's cache when the data has not changed."""
    if not enabled():
        return task.dataset(split, train=train)
    fingerprint = split_fingerprint(task.suite, task.data_root, task.task, split)["sha256"]
    key = (task.suite, task.task, task.data_root, task.size, split, train, fingerprint)
    data = _DATASETS.get(key)
    STATS["dataset_hits" if data is not None else "dataset_misses"] += 1
    if data is None:
        data = _remember(_DATASETS, key, task.dataset(split, train=train))
    _DATASETS.move_to_end(key)
    return data


def prepare_cached(task: TaskRef, backbone: BackboneRef, plan: TuningPlan, cfg: TrainConfig, *, phase: str,
                   seed: int, num_workers: int = 0) -> tuple[Trainer, DataLoader, DataLoader]:
    """`prepare_run` with the process's caches: the backbone with `plan` applied, its trainer, and the
    phase's (train, eval) loaders (seeded as prepare_run seeds them)."""
    model = backbone_for(backbone, task, seed)
    apply_plan(model, plan)
    train_split, eval_split = task.splits(phase)
    train, evaluate = run_loaders(dataset_for(task, train_split, train=True),
                                  dataset_for(task, eval_split, train=False), cfg, seed=seed, num_workers=num_workers)
    return Trainer(model, cfg), train, evaluate
