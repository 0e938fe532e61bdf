"""VTAB-1k layout loader: registry, transform, seeded loaders, every bad-data case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from spt_core.data import (
    DataError, GROUPS, MINI_TASKS, VTAB_TASKS, VtabDataset, build_dataset, make_loader, protocol_splits, task_info,
    vtab_loaders,
)

MODES = ["RGB", "L", "RGBA", "P", "P_transparent", "RGB_jpeg", "L_jpeg"]


def _image(mode: str, seed: int) -> tuple[Image.Image, str]:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    base, _, fmt = mode.partition("_")
    if base == "P":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        if fmt == "transparent":
            img.info["transparency"] = 0
        return img, "png"
    return (rgb.convert(base), "jpg" if fmt == "jpeg" else "png")


def write_vtab_task(root: Path, task: str = "eurosat", sizes: dict[str, int] | None = None,
                    num_classes: int = 10) -> Path:
    """A tiny task in the VTAB-1k layout with images of every mode, JPEG and PNG."""
    sizes = sizes or {"train800": 7, "val200": 3, "test": 5}
    task_dir = root / task
    (task_dir / "images").mkdir(parents=True)
    lines: dict[str, list[str]] = {}
    k = 0
    for split, n in sizes.items():
        lines[split] = []
        for _ in range(n):
            mode = MODES[k % len(MODES)]
            img, ext = _image(mode, k)
            rel = f"images/{split}_{k}.{ext}"
            if "transparency" in img.info:
                img.save(task_dir / rel, transparency=0)
            else:
                img.save(task_dir / rel)
            lines[split].append(f"{rel} {k % num_classes}")
            k += 1
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, ls in lines.items():
        (task_dir / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return task_dir


@pytest.fixture
def vtab_root(tmp_path: Path) -> Path:
    write_vtab_task(tmp_path)
    return tmp_path


def test_registry_matches_vtab_1k() -> None:
    assert len(VTAB_TASKS) == 19
    by_group = {g: [t for t in VTAB_TASKS.values() if t.group == g] for g in GROUPS}
    assert [len(by_group[g]) for g in GROUPS] == [7, 4, 8]
    expected = dict(cifar=100, caltech101=102, dtd=47, oxford_flowers102=102, oxford_iiit_pet=37, svhn=10,
                    sun397=397, patch_camelyon=2, eurosat=10, resisc45=45, diabetic_retinopathy=5, clevr_count=8,
                    clevr_dist=6, dmlab=6, kitti=4, dsprites_loc=16, dsprites_ori=16, smallnorb_azi=18,
                    smallnorb_ele=9)
    assert {n: t.num_classes for n, t in VTAB_TASKS.items()} == expected
    assert task_info("cifar").suite == "vtab" and task_info("count").suite == "mini"
    assert task_info("cub").num_classes == 200
    assert not set(VTAB_TASKS) & set(MINI_TASKS)
    with pytest.raises(KeyError, match="unknown task"):
        task_info("imagenet")


def test_reads_every_split_and_mode(vtab_root: Path) -> None:
    sizes = {"train800": 7, "val200": 3, "train800val200": 10, "test": 5}
    for split, n in sizes.items():
        ds = VtabDataset(vtab_root, "eurosat", split)
        assert len(ds) == n and ds.num_classes == 10
        for i in range(n):
            x, y = ds[i]
            assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and isinstance(y, int)


def test_transform_is_reference_bicubic_imagenet(vtab_root: Path) -> None:
    ds = VtabDataset(vtab_root, "eurosat", "train800", img_size=32)
    x, _ = ds[0]
    img = Image.open(ds.paths[0]).convert("RGB").resize((32, 32), Image.BICUBIC)
    ref = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    ref = (ref - torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]) / torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    assert torch.allclose(x, ref, atol=1e-5)


def test_loaders_are_seeded_and_eval_is_ordered(tmp_path: Path) -> None:
    write_vtab_task(tmp_path, sizes={"train800": 24, "val200": 6, "test": 2})

    def epochs(seed: int) -> list[list[int]]:
        train, _ = vtab_loaders(tmp_path, "eurosat", img_size=8, batch_size=5, seed=seed)
        return [torch.cat([y for _, y in train]).tolist() for _ in range(2)]

    before = torch.random.get_rng_state()
    a, b, c = epochs(0), epochs(0), epochs(1)
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is never consumed
    assert a == b and a != c and a[0] != a[1]
    _, val = vtab_loaders(tmp_path, "eurosat", img_size=8, batch_size=4)
    assert torch.cat([y for _, y in val]).tolist() == VtabDataset(tmp_path, "eurosat", "val200").targets


def test_build_dataset_and_protocol(vtab_root: Path) -> None:
    assert protocol_splits("cifar", "search") == ("train800", "val200")
    assert protocol_splits("count", "final") == ("train800val200", "test")
    assert protocol_splits("cub", "final") == ("trainval", "test")
    ds = build_dataset(vtab_root, "eurosat", "test", img_size=16)
    assert ds[0][0].shape == (3, 16, 16)


# ----------------------------------------------------------------------------- bad data
def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "fix:" in msg
    return msg


def test_missing_task_folder(vtab_root: Path) -> None:
    assert str(vtab_root / "cifar") in _error(VtabDataset, vtab_root, "cifar", "train800")
    assert "data root" in _error(VtabDataset, vtab_root / "nope", "eurosat")


def test_missing_split_file(vtab_root: Path) -> None:
    (vtab_root / "eurosat" / "val200.txt").unlink()
    assert str(vtab_root / "eurosat" / "val200.txt") in _error(VtabDataset, vtab_root, "eurosat", "val200")
    assert "unknown split" in _error(VtabDataset, vtab_root, "eurosat", "train")


@pytest.mark.parametrize("bad", ["images/x.png", "images/x.png seven", "images/x.png 1.5"])
def test_malformed_line(vtab_root: Path, bad: str) -> None:
    f = vtab_root / "eurosat" / "train800.txt"
    lines = f.read_text().splitlines()
    lines.insert(2, bad)
    f.write_text("\n".join(lines))
    assert f"{f}:3: malformed line" in _error(VtabDataset, vtab_root, "eurosat")


def test_label_outside_class_count(vtab_root: Path) -> None:
    f = vtab_root / "eurosat" / "train800.txt"
    lines = f.read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0] + " 10"
    f.write_text("\n".join(lines))
    msg = _error(VtabDataset, vtab_root, "eurosat")
    assert f"{f}:5: label 10 outside [0, 10)" in msg
    lines[4] = lines[4].rsplit(" ", 1)[0] + " -1"
    f.write_text("\n".join(lines))
    assert f"{f}:5: label -1" in _error(VtabDataset, vtab_root, "eurosat")


def test_missing_image(vtab_root: Path) -> None:
    ds = VtabDataset(vtab_root, "eurosat", "val200")
    ds.paths[1].unlink()
    msg = _error(VtabDataset, vtab_root, "eurosat", "val200")
    assert f"val200.txt:2: image {ds.paths[1]} not found" in msg and "1 of 3" in msg


def test_empty_split(vtab_root: Path) -> None:
    (vtab_root / "eurosat" / "test.txt").write_text("\n\n")
    assert "test.txt lists no images" in _error(VtabDataset, vtab_root, "eurosat", "test")


def test_unknown_task_needs_num_classes(tmp_path: Path) -> None:
    write_vtab_task(tmp_path, task="my_task", num_classes=3)
    assert "num_classes" in _error(VtabDataset, tmp_path, "my_task")
    assert len(VtabDataset(tmp_path, "my_task", num_classes=3)) == 7


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_unreadable_image_raises_at_load_with_path(vtab_root: Path, content: bytes) -> None:
    ds = VtabDataset(vtab_root, "eurosat", "train800", img_size=8)
    ds.paths[2].write_bytes(content)
    msg = _error(ds.__getitem__, 2)
    assert str(ds.paths[2]) in msg and "train800.txt:3" in msg


def test_truncated_jpeg(vtab_root: Path) -> None:
    ds = VtabDataset(vtab_root, "eurosat", "train800", img_size=8)
    jpeg = next(i for i, p in enumerate(ds.paths) if p.suffix == ".jpg")
    ds.paths[jpeg].write_bytes(ds.paths[jpeg].read_bytes()[:200])
    assert str(ds.paths[jpeg]) in _error(ds.__getitem__, jpeg)


def test_worker_error_is_one_line(vtab_root: Path) -> None:
    ds = VtabDataset(vtab_root, "eurosat", "train800", img_size=8)
    ds.paths[5].write_bytes(b"garbage")
    loader = make_loader(ds, batch_size=2, train=False, num_workers=1)
    before = {c.pid for c in psutil.Process().children()}
    msg = _error(lambda: list(loader))
    assert msg.startswith("cannot read image") and str(ds.paths[5]) in msg and "Traceback" not in msg
    # the worker stopped with the error, not when the loader is collected (a 5 s join for persistent workers)
    assert {c.pid for c in psutil.Process().children()} <= before
