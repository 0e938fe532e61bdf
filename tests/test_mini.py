"""The embedded mini suite: registry, VTAB layout on disk, determinism, atomic and skipped rewrites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spt_core.data import GROUPS, MINI_SPECS, MINI_TASKS, VtabDataset, generate_task, task_info, write_mini_suite
from spt_core.data.mini import MANIFEST

SMALL = (48, 16, 24)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_registry_covers_three_groups() -> None:
    assert len(MINI_TASKS) >= 6
    assert {t.group for t in MINI_TASKS.values()} == set(GROUPS)
    for name, info in MINI_TASKS.items():
        assert task_info(name) is info and info.suite == "mini" and info.img_size == 32 and info.num_classes >= 2


@pytest.mark.parametrize("name", list(MINI_SPECS))
def test_generators_balanced_and_varied(name: str) -> None:
    data = generate_task(name, seed=0, sizes=(40, 0, 8))
    images, labels = data["trainval"]
    k = MINI_TASKS[name].num_classes
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    counts = np.bincount(labels, minlength=k)
    assert counts.max() - counts.min() <= 1 and len(counts) == k
    assert images.reshape(40, -1).std(axis=1).min() > 5  # no blank images
    assert len({im.tobytes() for im in images}) == 40
    assert data["test"][0].shape == (8, 32, 32, 3)


def test_written_suite_is_vtab_layout(tmp_path: Path) -> None:
    root = write_mini_suite(tmp_path / "mini", seed=0, tasks=["count", "cells"], sizes=SMALL)
    assert sorted(p.name for p in root.iterdir()) == ["cells", "count"]  # no temporary folders left behind
    for task in ("count", "cells"):
        lists = {s: (root / task / f"{s}.txt").read_text().splitlines()
                 for s in ("train800", "val200", "train800val200", "test")}
        assert [len(lists[s]) for s in ("train800", "val200", "test")] == list(SMALL)
        assert lists["train800val200"] == lists["train800"] + lists["val200"]
        assert not set(lists["train800"]) & set(lists["val200"])
        first = lists["train800"][0].split()[0]
        assert first.startswith("images/") and Image.open(root / task / first).size == (32, 32)
        ds = VtabDataset(root, task, "test", img_size=32)
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and 0 <= y < MINI_TASKS[task].num_classes
        manifest = json.loads((root / task / MANIFEST).read_text())
        assert manifest["seed"] == 0 and manifest["task"] == task and len(manifest["content_sha256"]) == 64


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    kw = dict(tasks=["distance", "textures"], sizes=SMALL)
    a = _files(write_mini_suite(tmp_path / "a", seed=7, **kw))
    b = _files(write_mini_suite(tmp_path / "b", seed=7, **kw))
    c = _files(write_mini_suite(tmp_path / "c", seed=8, **kw))
    assert a == b
    assert a.keys() == c.keys() and a != c
    pngs = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != c[k] for k in pngs) > 0.9 * len(pngs)


def test_existing_suite_is_kept_and_changed_seed_rewritten(tmp_path: Path) -> None:
    root = write_mini_suite(tmp_path, seed=0, tasks=["orientation"], sizes=SMALL)
    marker = root / "orientation" / "images" / "test" / "00000.png"
    stamp = marker.stat().st_mtime_ns
    write_mini_suite(tmp_path, seed=0, tasks=["orientation"], sizes=SMALL)
    assert marker.stat().st_mtime_ns == stamp
    before = marker.read_bytes()
    write_mini_suite(tmp_path, seed=1, tasks=["orientation"], sizes=SMALL)
    assert marker.read_bytes() != before
    assert json.loads((root / "orientation" / MANIFEST).read_text())["seed"] == 1
    assert sorted(p.name for p in root.iterdir()) == ["orientation"]


def test_unknown_task_rejected(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown mini task"):
        write_mini_suite(tmp_path, tasks=["cifar"])


def test_mini_loader_feeds_a_model(tmp_path: Path) -> None:
    from spt_core.data import vtab_loaders

    root = write_mini_suite(tmp_path, tasks=["location"], sizes=SMALL)
    train, val = vtab_loaders(root, "location", batch_size=16, seed=0)
    x, y = next(iter(train))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64
    assert len(val.dataset) == SMALL[1]


def test_add_distractors_paints_exactly_the_given_counts() -> None:
    from spt_core.data import render as R

    counts = np.array([0, 1, 2, 3])
    blank = np.zeros((4, 32, 32, 3))
    painted = R.add_distractors(np.random.default_rng(0), blank, slots=3, radius=(2.5, 2.5), counts=counts,
                                margin=8.0)
    changed = (painted != 0).any(-1)
    assert not changed[0].any() and changed[1:].any((1, 2)).all()
    # one, two, three shapes of the same radius: the painted area grows with the count (overlaps aside)
    assert changed[1].sum() < changed[3].sum()
    # centres at least 8 px inside: shapes of radius 2.5 leave a 3-pixel border untouched
    border = np.ones((32, 32), dtype=bool)
    border[3:-3, 3:-3] = False
    assert not changed[:, border].any()
    unbounded = R.add_distractors(np.random.default_rng(0), np.zeros((64, 32, 32, 3)), slots=3,
                                  radius=(2.5, 2.5), counts=np.full(64, 3))
    assert (unbounded != 0).any(-1)[:, border].any()  # without the margin they do reach it
