"""FGVC: CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars in the VPT JSON layout.

A dataset folder holds ``train.json``, ``val.json``, ``test.json`` (image file name -> class id) and its
images (under ``images/``, ``Images/`` or the folder itself). Original class ids are remapped to
contiguous ids by sorting the ids found across all three splits, so every split agrees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .common import DataError, TaskInfo, check_images_exist, load_rgb, make_loaders, require_dir, require_file

FGVC_SPLITS = ("train", "val", "test", "trainval")

# name -> (classes, image folder inside the dataset folder, accepted dataset folder names)
_FGVC_LAYOUT: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "cub": (200, "images", ("cub", "CUB_200_2011", "CUB")),
    "nabirds": (555, "images", ("nabirds", "NABirds")),
    "oxford_flowers": (102, "", ("oxford_flowers", "OxfordFlower", "OxfordFlowers")),
    "stanford_dogs": (120, "Images", ("stanford_dogs", "Stanford-dogs", "StanfordDogs")),
    "stanford_cars": (196, "", ("stanford_cars", "Stanford-cars", "StanfordCars")),
}
FGVC_TASKS: dict[str, TaskInfo] = {name: TaskInfo(name, "FGVC", n, "fgvc") for name, (n, _, _) in _FGVC_LAYOUT.items()}


def fgvc_transform(img_size: int = 224, *, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """VPT's FGVC pipeline scaled to ``img_size``: resize to 256/224 * size, then random crop + horizontal
    flip (train) or centre crop (eval), ImageNet mean/std normalisation."""
    resize = round(img_size * 256 / 224)
    crop = [T.RandomCrop(img_size), T.RandomHorizontalFlip(0.5)] if train else [T.CenterCrop(img_size)]
    return T.Compose([T.Resize((resize, resize)), *crop, T.ToTensor(),
                      T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def fgvc_dir(root: str | Path, name: str) -> Path:
    """The dataset folder of ``name`` under ``root`` (its own name or a common alias like CUB_200_2011)."""
    if name not in _FGVC_LAYOUT:
        raise DataError(f"unknown FGVC dataset {name!r}; fix: use one of {', '.join(_FGVC_LAYOUT)}")
    root = require_dir(Path(root), "data root", "pass the folder that holds the FGVC dataset folders")
    for folder in _FGVC_LAYOUT[name][2]:
        if (root / folder).is_dir():
            return root / folder
    raise DataError(f"dataset folder for {name} not found under {root} (looked for "
                    f"{', '.join(_FGVC_LAYOUT[name][2])}); fix: place or link the dataset there")


def read_split_json(path: Path) -> dict[str, int | str]:
    """Parse one split file: a JSON object mapping image file name -> class id."""
    require_file(path, "split file", f"add {path.name} (a JSON object: image file name -> class id)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); "
                        "fix: rewrite it as an object mapping image file name -> class id") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read split file {path}: {type(err).__name__}; fix: rewrite it as UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object (image file name -> class id), got {type(data).__name__}; "
                        "fix: rewrite the split file")
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (
                isinstance(value, str) and not value.lstrip("-").isdigit()):
            raise DataError(f"{path}: entry {key!r} has class id {value!r}, not an integer; fix: correct that entry")
    if not data:
        raise DataError(f"split file {path} lists no images; fix: regenerate the split files")
    return data


class FgvcDataset(Dataset):
    """One split (train, val, test or trainval = train + val) of an FGVC dataset, validated at construction."""

    def __init__(self, root: str | Path, name: str, split: str = "train", *,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None, img_size: int = 224,
                 train: bool | None = None) -> None:
        if split not in FGVC_SPLITS:
            raise DataError(f"unknown split {split!r} for {name}; fix: use one of {', '.join(FGVC_SPLITS)}")
        self.name, self.split = name, split
        self.data_dir = fgvc_dir(root, name)
        num_classes, image_dir, _ = _FGVC_LAYOUT[name]
        self.num_classes = num_classes
        self.image_dir = require_dir(self.data_dir / image_dir if image_dir else self.data_dir, "image folder",
                                     f"put the {name} images under {self.data_dir / image_dir}")
        splits = {s: read_split_json(self.data_dir / f"{s}.json") for s in ("train", "val", "test")}
        self.class_ids = sorted({int(v) for data in splits.values() for v in data.values()})
        if len(self.class_ids) > num_classes:
            raise DataError(f"{self.data_dir}: the split files hold {len(self.class_ids)} distinct class ids, "
                            f"{name} has {num_classes}; fix: check the split files belong to {name}")
        remap = {cid: i for i, cid in enumerate(self.class_ids)}
        parts = ("train", "val") if split == "trainval" else (split,)
        self.paths, self.targets, self._where = [], [], []
        for part in parts:
            json_path = self.data_dir / f"{part}.json"
            for fname, cid in splits[part].items():
                self.paths.append(self.image_dir / fname)
                self.targets.append(remap[int(cid)])
                self._where.append(f"{json_path} entry {fname!r}")
        check_images_exist(self.paths, self._where, self.data_dir / f"{parts[0]}.json")
        is_train = split in ("train", "trainval") if train is None else train
        self.transform = transform if transform is not None else fgvc_transform(img_size, train=is_train)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_rgb(self.paths[index], listed_in=self._where[index])
        return self.transform(image), self.targets[index]


def fgvc_loaders(root: str | Path, name: str, *, train_split: str = "train", eval_split: str = "val",
                 img_size: int = 224, batch_size: int = 64, eval_batch_size: int | None = None, seed: int = 0,
                 num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """Seeded (train loader with augmentation, eval loader without) for an FGVC dataset."""
    train_set = FgvcDataset(root, name, train_split, img_size=img_size, train=True)
    eval_set = FgvcDataset(root, name, eval_split, img_size=img_size, train=False)
    return make_loaders(train_set, eval_set, batch_size=batch_size, eval_batch_size=eval_batch_size,
                        seed=seed, num_workers=num_workers)
