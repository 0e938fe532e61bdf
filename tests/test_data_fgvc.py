"""FGVC JSON-layout loader: folders, contiguous class remap, transforms, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spt_core.data import DataError, FgvcDataset, fgvc_loaders, fgvc_transform

# original (non-contiguous) class ids; test holds an id the train split never uses
SPLITS = {
    "train": {"a/1.jpg": 17, "a/2.png": 3, "b/3.jpg": 200, "b/4.png": 17},
    "val": {"c/5.jpg": 3, "c/6.png": 42},
    "test": {"d/7.jpg": 99, "d/8.png": 200, "d/9.jpg": 3},
}
REMAP = {3: 0, 17: 1, 42: 2, 99: 3, 200: 4}


def write_fgvc(root: Path, folder: str, image_dir: str) -> Path:
    data_dir = root / folder
    rng = np.random.default_rng(0)
    for split, mapping in SPLITS.items():
        for i, name in enumerate(mapping):
            path = data_dir / image_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8))
            (img.convert("L") if i % 2 else img).save(path)
        (data_dir / f"{split}.json").write_text(json.dumps(mapping, indent=1))
    return data_dir


@pytest.mark.parametrize("name,folder,image_dir", [
    ("cub", "CUB_200_2011", "images"), ("nabirds", "nabirds", "images"), ("oxford_flowers", "OxfordFlower", ""),
    ("stanford_dogs", "Stanford-dogs", "Images"), ("stanford_cars", "stanford_cars", ""),
])
def test_layouts_and_consistent_remap(tmp_path: Path, name: str, folder: str, image_dir: str) -> None:
    write_fgvc(tmp_path, folder, image_dir)
    for split, mapping in SPLITS.items():
        ds = FgvcDataset(tmp_path, name, split, img_size=32)
        assert ds.targets == [REMAP[c] for c in mapping.values()]
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and y == REMAP[next(iter(mapping.values()))]
    assert len(FgvcDataset(tmp_path, name, "trainval")) == 6


def test_transforms_train_random_eval_fixed(tmp_path: Path) -> None:
    write_fgvc(tmp_path, "cub", "images")
    train = FgvcDataset(tmp_path, "cub", "train")
    test = FgvcDataset(tmp_path, "cub", "test")
    assert train[0][0].shape == (3, 224, 224)
    assert torch.equal(test[0][0], test[0][0])
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    steps = [type(t).__name__ for t in fgvc_transform(64, train=True).transforms]
    assert steps == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert fgvc_transform(64, train=False).transforms[0].size == (73, 73)


def test_loaders_seeded(tmp_path: Path) -> None:
    write_fgvc(tmp_path, "cub", "images")

    def run(seed: int) -> tuple[list[int], torch.Tensor]:
        train, _ = fgvc_loaders(tmp_path, "cub", img_size=16, batch_size=4, seed=seed)
        batches = list(train)
        return torch.cat([y for _, y in batches]).tolist(), torch.cat([x for x, _ in batches])

    before = torch.random.get_rng_state()
    (ya, xa), (yb, xb), (_, xc) = run(3), run(3), run(4)
    assert ya == yb and torch.equal(xa, xb)  # same order and same random crops/flips
    assert not torch.equal(xa, xc)
    assert torch.equal(before, torch.random.get_rng_state())


def _error(*args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        FgvcDataset(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "fix:" in msg
    return msg


def test_bad_fgvc_data(tmp_path: Path) -> None:
    assert "unknown FGVC dataset" in _error(tmp_path, "birds", "train")
    assert "CUB_200_2011" in _error(tmp_path, "cub", "train")  # folder missing: says where it looked
    data_dir = write_fgvc(tmp_path, "cub", "images")
    assert "unknown split" in _error(tmp_path, "cub", "train800")

    (data_dir / "val.json").unlink()
    assert str(data_dir / "val.json") in _error(tmp_path, "cub", "train")
    (data_dir / "val.json").write_text('{"c/5.jpg": 3,\n "c/6.png": }')
    assert f"{data_dir / 'val.json'}:2: invalid JSON" in _error(tmp_path, "cub", "train")
    (data_dir / "val.json").write_text('{"c/5.jpg": "three"}')
    assert "'c/5.jpg'" in _error(tmp_path, "cub", "val")
    (data_dir / "val.json").write_text("[]")
    assert "expected a JSON object" in _error(tmp_path, "cub", "val")
    (data_dir / "val.json").write_text("{}")
    assert "lists no images" in _error(tmp_path, "cub", "val")
    (data_dir / "val.json").write_text(json.dumps({f"c/{i}.jpg": i for i in range(300)}))
    assert "300 distinct class ids" in _error(tmp_path, "cub", "test")

    (data_dir / "val.json").write_text(json.dumps(SPLITS["val"]))
    (data_dir / "images" / "d" / "8.png").unlink()
    msg = _error(tmp_path, "cub", "test")
    assert "test.json entry 'd/8.png'" in msg and "not found" in msg


def test_unreadable_fgvc_image(tmp_path: Path) -> None:
    write_fgvc(tmp_path, "cub", "images")
    ds = FgvcDataset(tmp_path, "cub", "val")
    ds.paths[1].write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(DataError, match="cannot read image .*6.png.*val.json entry 'c/6.png'"):
        ds[1]
