"""VTAB-1k: the 19-task registry, the list-file Dataset and the reference transform.

Layout: ``<root>/<task>/{train800,val200,train800val200,test}.txt`` and ``<root>/<task>/images/``; each
list line is ``<image path relative to the task folder> <integer label>``. The embedded mini suite is
written in the same layout and read by the same Dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .common import DataError, TaskInfo, check_images_exist, load_rgb, make_loaders, require_dir, require_file
from .fgvc import FGVC_TASKS
from .mini import MINI_TASKS

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")


def _tasks(group: str, spec: dict[str, int]) -> dict[str, TaskInfo]:
    return {name: TaskInfo(name, group, n, "vtab") for name, n in spec.items()}


VTAB_TASKS: dict[str, TaskInfo] = {
    **_tasks("Natural", dict(cifar=100, caltech101=102, dtd=47, oxford_flowers102=102, oxford_iiit_pet=37,
                             svhn=10, sun397=397)),
    **_tasks("Specialized", dict(patch_camelyon=2, eurosat=10, resisc45=45, diabetic_retinopathy=5)),
    **_tasks("Structured", dict(clevr_count=8, clevr_dist=6, dmlab=6, kitti=4, dsprites_loc=16,
                                dsprites_ori=16, smallnorb_azi=18, smallnorb_ele=9)),
}


def task_info(name: str) -> TaskInfo:
    """Metadata of a known task: VTAB-1k first, then the embedded mini suite, then FGVC."""
    for registry in (VTAB_TASKS, MINI_TASKS, FGVC_TASKS):
        if name in registry:
            return registry[name]
    known = ", ".join([*VTAB_TASKS, *MINI_TASKS, *FGVC_TASKS])
    raise KeyError(f"unknown task {name!r}; known tasks: {known}")


def vtab_transform(img_size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """The reference VTAB input pipeline: bicubic resize to a square, ImageNet mean/std normalisation."""
    return T.Compose([
        T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def read_list_file(path: Path, num_classes: int) -> list[tuple[str, int, int]]:
    """Parse a VTAB list file into (relative path, label, line number); DataError on any bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read split file {path}: {type(err).__name__}; "
                        "fix: rewrite it as UTF-8 text, one '<image path> <label>' per line") from None
    entries = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{lineno}: malformed line {line[:80]!r}; "
                            "fix: each line must be '<relative image path> <integer label>'")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise DataError(f"{path}:{lineno}: label {label} outside [0, {num_classes}); "
                            "fix: correct the label or the task's class count")
        entries.append((parts[0], label, lineno))
    if not entries:
        raise DataError(f"split file {path} lists no images; fix: regenerate the split lists")
    return entries


class VtabDataset(Dataset):
    """One split of one task in the VTAB-1k layout. Everything but image decoding is checked here, at
    construction; an unreadable image raises DataError (with its path) when it is loaded."""

    def __init__(self, root: str | Path, task: str, split: str = "train800", *,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None, img_size: int = 224,
                 num_classes: int | None = None) -> None:
        if split not in VTAB_SPLITS:
            raise DataError(f"unknown split {split!r} for task {task}; fix: use one of {', '.join(VTAB_SPLITS)}")
        if num_classes is None:
            try:
                num_classes = task_info(task).num_classes
            except KeyError:
                raise DataError(f"task {task!r} under {root} is not a known task; "
                                "fix: pass num_classes= for a custom task") from None
        self.task, self.split, self.num_classes = task, split, num_classes
        root = require_dir(Path(root), "data root", "pass the folder that holds one folder per task")
        self.task_dir = require_dir(root / task, "task folder",
                                    f"put the task under {root} (expected {root / task / (split + '.txt')})")
        self.list_file = require_file(self.task_dir / f"{split}.txt", "split file",
                                      f"add {split}.txt (lines '<image path> <label>') to {self.task_dir}")
        entries = read_list_file(self.list_file, num_classes)
        self.paths = [self.task_dir / rel for rel, _, _ in entries]
        self.targets = [label for _, label, _ in entries]
        self._where = [f"{self.list_file}:{lineno}" for _, _, lineno in entries]
        check_images_exist(self.paths, self._where, self.list_file)
        self.transform = transform if transform is not None else vtab_transform(img_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_rgb(self.paths[index], listed_in=self._where[index])
        return self.transform(image), self.targets[index]


def vtab_loaders(root: str | Path, task: str, *, train_split: str = "train800", eval_split: str = "val200",
                 img_size: int | None = None, batch_size: int = 64, eval_batch_size: int | None = None,
                 seed: int = 0, num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """Seeded (train, eval) loaders for a VTAB-layout task; img_size defaults to the task's native size
    (224, or 32 for the mini suite)."""
    size = img_size or (task_info(task).img_size if task in MINI_TASKS else 224)
    train_set = VtabDataset(root, task, train_split, img_size=size)
    eval_set = VtabDataset(root, task, eval_split, img_size=size)
    return make_loaders(train_set, eval_set, batch_size=batch_size, eval_batch_size=eval_batch_size,
                        seed=seed, num_workers=num_workers)
