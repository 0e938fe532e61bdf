"""One entry point for any known task: its protocol splits and its Dataset, whatever the suite."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from .fgvc import FgvcDataset
from .vtab import VtabDataset, task_info

_VTAB_PROTOCOL = {"search": ("train800", "val200"), "final": ("train800val200", "test")}
PROTOCOL_SPLITS: dict[str, dict[str, tuple[str, str]]] = {
    "vtab": _VTAB_PROTOCOL,
    "mini": _VTAB_PROTOCOL,
    "fgvc": {"search": ("train", "val"), "final": ("trainval", "test")},
}


def protocol_splits(task: str, phase: str) -> tuple[str, str]:
    """(train split, eval split) of ``phase`` ("search": tune on val, "final": retrain and test)."""
    suite = task_info(task).suite
    if phase not in PROTOCOL_SPLITS[suite]:
        raise ValueError(f"unknown phase {phase!r}; use 'search' or 'final'")
    return PROTOCOL_SPLITS[suite][phase]


def build_dataset(root: str | Path, task: str, split: str, *, img_size: int | None = None,
                  train: bool = False) -> Dataset:
    """The Dataset of a known task's split; ``img_size`` defaults to the task's native size. ``train``
    turns on the suite's training augmentation (FGVC only; VTAB-1k and mini use none)."""
    info = task_info(task)
    size = img_size or info.img_size
    if info.suite == "fgvc":
        return FgvcDataset(root, task, split, img_size=size, train=train)
    return VtabDataset(root, task, split, img_size=size)
