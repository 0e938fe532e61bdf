"""The embedded ``mini`` suite: eight VTAB-like 32 x 32 tasks generated from a seed, no download.

Natural: ``shapes`` (which of 10 shapes, any colour/fill, clutter), ``textures`` (which of 10 textures).
Specialized: ``cells`` (pathology-like: atypical cells in the centre region or not; atypical cells at the
border do not count), ``landcover`` (satellite-like: forest, crops, water, residential, highway, river).
Structured: ``count`` (1-8 objects), ``location`` (4 x 4 position bin), ``orientation`` (8 heading bins
of an arrow), ``distance`` (6 bins of the distance between two objects).

``write_mini_suite`` writes them in the VTAB-1k layout (PNG images, list files), so ``VtabDataset`` reads
them. Labels are balanced. Each task has its own ``numpy`` Generator seeded by (seed, task), so a task's
bytes depend only on the seed, the sizes and ``MINI_VERSION`` (bump it when a generator changes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from . import render as R
from .common import TaskInfo

MINI_VERSION = 1
MINI_SIZE = 32
DEFAULT_SIZES = (800, 200, 1000)  # train800, val200, test
MANIFEST = "mini_manifest.json"

Generator = Callable[[np.random.Generator, np.ndarray, int], np.ndarray]

SHAPE_CLASSES = ("disk", "square", "triangle", "pentagon", "hexagon", "diamond", "star", "cross", "heart",
                 "crescent")
TEXTURE_CLASSES = ("stripes", "checker", "dots", "waves", "rings", "grid", "zigzag", "blobs", "speckle",
                   "gradient")
LANDCOVER_CLASSES = ("forest", "crops", "water", "residential", "highway", "river")
SIMPLE_SHAPES = ("disk", "square", "triangle", "hexagon")


# ----------------------------------------------------------------------------- helpers
def _uniform_in_bins(rng: np.random.Generator, bins: np.ndarray, width: float, offset: float = 0.0) -> np.ndarray:
    return offset + (bins + rng.random(len(bins))) * width


def _band(dist: np.ndarray, half_width: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a band |dist| < half_width (per-image widths)."""
    return np.clip(half_width[:, None, None] - np.abs(dist) + 0.5, 0, 1)


def _paint_objects(rng: np.random.Generator, canvas: np.ndarray, centres: np.ndarray, radii: np.ndarray,
                   shapes: tuple[str, ...]) -> np.ndarray:
    """Paint objects slot by slot; ``centres`` (n, k, 2) and ``radii`` (n, k) with NaN for empty slots."""
    n, size = canvas.shape[0], canvas.shape[1]
    for j in range(centres.shape[1]):
        present = ~np.isnan(radii[:, j])
        cx, cy = np.nan_to_num(centres[:, j, 0]), np.nan_to_num(centres[:, j, 1])
        cov = R.shape_coverage(rng.choice(shapes, n), cx, cy, np.nan_to_num(radii[:, j], nan=1.0),
                               rng.uniform(0, 2 * np.pi, n), size)
        canvas = R.paint(canvas, cov * present[:, None, None], R.random_colours(rng, n))
    return canvas


def _place_disjoint(rng: np.random.Generator, count: int, radius: tuple[float, float], size: int,
                    margin: float, gap: float, max_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Rejection-sample ``count`` non-overlapping discs; returns (centres (max_slots, 2), radii) NaN-padded."""
    while True:
        centres, radii = [], []
        for _ in range(count):
            for _attempt in range(200):
                r = rng.uniform(*radius)
                c = rng.uniform(margin, size - margin, 2)
                if all(np.hypot(*(c - o)) >= r + ro + gap for o, ro in zip(centres, radii)):
                    centres.append(c)
                    radii.append(r)
                    break
            else:
                break
        if len(centres) == count:
            out_c = np.full((max_slots, 2), np.nan)
            out_r = np.full(max_slots, np.nan)
            out_c[:count], out_r[:count] = centres, radii
            return out_c, out_r


# ----------------------------------------------------------------------------- natural
def gen_shapes(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Which of 10 shapes (6 of them unseen upstream), random colour, fill, pose, clutter."""
    n = len(labels)
    canvas = R.add_distractors(rng, R.cluttered_background(rng, n, size), radius=(2.0, 3.5))
    radius = rng.uniform(5, 10, n)
    cx, cy = (rng.uniform(0.7 * radius, size - 0.7 * radius) for _ in range(2))
    cov = R.shape_coverage(np.array(SHAPE_CLASSES)[labels], cx, cy, radius, rng.uniform(0, 2 * np.pi, n), size)
    fill = R.two_tone(R.texture(rng, rng.choice(R.TEXTURES, n), size, freq=(0.2, 0.35)),
                      R.random_colours(rng, n), R.random_colours(rng, n))
    return R.to_uint8(R.paint(canvas, cov, fill), rng, noise=0.04)


def gen_textures(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Which of 10 textures, random colours, scale, orientation and uneven lighting."""
    n = len(labels)
    pattern = R.texture(rng, np.array(TEXTURE_CLASSES)[labels], size, freq=(0.08, 0.3))
    c0 = R.random_colours(rng, n, sat=(0.2, 0.9), val=(0.3, 0.9))
    c1 = R.random_colours(rng, n, sat=(0.2, 0.9), val=(0.3, 0.9))
    c1 = np.where(np.abs(c0 - c1).sum(1, keepdims=True) < 0.5, 1 - c0, c1)
    light = 0.75 + 0.5 * R.smooth_noise(rng, n, size, 2)
    return R.to_uint8(R.two_tone(pattern, c0, c1) * light[..., None], rng, noise=0.05)


# ----------------------------------------------------------------------------- specialized
def gen_cells(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Tissue with 18-31 small nuclei; label 1 iff 1-3 large dark atypical cells lie in the central
    16 x 16 region. Half of the negatives carry one atypical cell near the border (it does not count)."""
    n, slots = len(labels), 31
    pink = R.random_colours(rng, n, hue=rng.uniform(0.88, 0.97, n), sat=(0.15, 0.35), val=(0.8, 0.95))
    canvas = R.two_tone(R.smooth_noise(rng, n, size, 4), pink, pink * rng.uniform(0.8, 0.95, (n, 1)))
    count = rng.integers(18, slots + 1, n)
    for j in range(slots):
        present = j < count
        cov = R.shape_coverage(rng.choice(("disk", "ellipse"), n), rng.uniform(0, size, n),
                               rng.uniform(0, size, n), rng.uniform(1.3, 2.3, n), rng.uniform(0, 2 * np.pi, n), size)
        colour = R.random_colours(rng, n, hue=rng.uniform(0.72, 0.82, n), sat=(0.4, 0.7), val=(0.35, 0.6))
        canvas = R.paint(canvas, cov * present[:, None, None], colour)
    n_atypical = np.where(labels == 1, rng.integers(1, 4, n), (rng.random(n) < 0.5).astype(int))
    for j in range(3):
        present = j < n_atypical
        centre = rng.uniform(8, 24, (n, 2))
        side, along = rng.integers(0, 4, n), rng.uniform(2, size - 2, n)
        depth = rng.uniform(2, 5, n)
        border = np.stack([np.choose(side, [depth, size - depth, along, along]),
                           np.choose(side, [along, along, depth, size - depth])], axis=1)
        pos = np.where((labels == 1)[:, None], centre, border)
        cov = R.shape_coverage(rng.choice(("hexagon", "pentagon", "star", "heart"), n), pos[:, 0], pos[:, 1],
                               rng.uniform(2.8, 4.0, n), rng.uniform(0, 2 * np.pi, n), size)
        colour = R.random_colours(rng, n, hue=rng.uniform(0.72, 0.85, n), sat=(0.6, 0.9), val=(0.15, 0.35))
        canvas = R.paint(canvas, cov * present[:, None, None], colour)
    return R.to_uint8(canvas, rng, noise=0.04)


def _greenery(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    c0 = R.random_colours(rng, n, hue=rng.uniform(0.14, 0.35, n), sat=(0.3, 0.7), val=(0.35, 0.7))
    return R.two_tone(R.smooth_noise(rng, n, size, 5), c0, c0 * rng.uniform(0.7, 0.9, (n, 1)))


def _land_tile(kind: str, rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    xx, yy = R.pixel_grid(size)
    if kind == "forest":
        blobs = np.clip((R.smooth_noise(rng, n, size, 8) - 0.5) * 4 + 0.5, 0, 1)
        dark = R.random_colours(rng, n, hue=rng.uniform(0.27, 0.38, n), sat=(0.5, 0.8), val=(0.15, 0.3))
        return R.two_tone(blobs, dark, dark * rng.uniform(1.4, 2.0, (n, 1)))
    if kind == "crops":
        c0 = R.random_colours(rng, n, hue=rng.uniform(0.12, 0.3, n), sat=(0.5, 0.8), val=(0.45, 0.75))
        fields = [R.texture(rng, ["stripes"] * n, size, freq=(0.15, 0.35)) for _ in range(2)]
        a = rng.uniform(0, np.pi, n)[:, None, None]
        split = (xx - 16) * np.cos(a) + (yy - 16) * np.sin(a) > rng.uniform(-8, 8, n)[:, None, None]
        return R.two_tone(np.where(split, fields[0], fields[1]), c0, c0 * 0.7)
    if kind == "water":
        blue = R.random_colours(rng, n, hue=rng.uniform(0.55, 0.65, n), sat=(0.5, 0.8), val=(0.3, 0.6))
        return R.two_tone(0.3 * R.texture(rng, ["waves"] * n, size, freq=(0.05, 0.15)), blue, np.clip(blue * 1.25, 0, 1))
    if kind == "residential":
        base = R.random_colours(rng, n, sat=(0.05, 0.25), val=(0.55, 0.8))
        roads = R.texture(rng, ["grid"] * n, size, freq=(0.15, 0.25))
        roofs = R.texture(rng, ["dots"] * n, size, freq=(0.15, 0.25)) * (1 - roads)
        canvas = R.paint(base[:, None, None, :] * np.ones((1, size, size, 1)), roads,
                         R.random_colours(rng, n, sat=(0.0, 0.1), val=(0.35, 0.6)))
        return R.paint(canvas, roofs, R.random_colours(rng, n, hue=rng.uniform(0.0, 0.08, n), sat=(0.4, 0.7),
                                                       val=(0.4, 0.7)))
    if kind in ("highway", "river"):
        canvas = _greenery(rng, n, size)
        a = rng.uniform(0, np.pi, n)[:, None, None]
        px, py = (rng.uniform(10, 22, n)[:, None, None] for _ in range(2))
        along = (xx - px) * np.cos(a) + (yy - py) * np.sin(a)
        across = -(xx - px) * np.sin(a) + (yy - py) * np.cos(a)
        if kind == "highway":
            colour = R.random_colours(rng, n, sat=(0.0, 0.1), val=(0.4, 0.7))
            return R.paint(canvas, _band(across, rng.uniform(1.2, 2.5, n)), colour)
        amp, freq = rng.uniform(2, 5, n)[:, None, None], rng.uniform(0.03, 0.06, n)[:, None, None]
        curve = across - amp * np.sin(2 * np.pi * freq * along + rng.uniform(0, 2 * np.pi, n)[:, None, None])
        colour = R.random_colours(rng, n, hue=rng.uniform(0.55, 0.65, n), sat=(0.5, 0.8), val=(0.35, 0.6))
        return R.paint(canvas, _band(curve, rng.uniform(1.5, 3.5, n)), colour)
    raise KeyError(kind)


def gen_landcover(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Satellite-like tiles of 6 land-cover classes with colour and brightness jitter."""
    n = len(labels)
    canvas = np.empty((n, size, size, 3))
    for k, kind in enumerate(LANDCOVER_CLASSES):
        sel = labels == k
        if sel.any():
            canvas[sel] = _land_tile(kind, rng, int(sel.sum()), size)
    gain = rng.uniform(0.85, 1.15, (n, 1, 1, 1)) * rng.uniform(0.93, 1.07, (n, 1, 1, 3))
    return R.to_uint8(canvas * gain, rng, noise=0.04)


# ----------------------------------------------------------------------------- structured
def gen_count(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Count 1-8 small non-overlapping objects (label = count - 1) on a cluttered background."""
    n, slots = len(labels), 8
    placed = [_place_disjoint(rng, int(c) + 1, (2.2, 3.3), size, 3.0, 1.5, slots) for c in labels]
    centres = np.stack([c for c, _ in placed])
    radii = np.stack([r for _, r in placed])
    return R.to_uint8(_paint_objects(rng, R.natural_background(rng, n, size), centres, radii, SIMPLE_SHAPES),
                      rng, noise=0.04)


def gen_location(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Position bin (4 x 4 grid, label = 4 * row + column) of one object among small distractors."""
    n = len(labels)
    canvas = R.add_distractors(rng, R.natural_background(rng, n, size), slots=1, radius=(1.5, 2.5))
    cell = size / 4
    cx, cy = _uniform_in_bins(rng, labels % 4, cell), _uniform_in_bins(rng, labels // 4, cell)
    cov = R.shape_coverage(rng.choice(list(R.SHAPES), n), cx, cy, rng.uniform(3.5, 5.5, n),
                           rng.uniform(0, 2 * np.pi, n), size)
    return R.to_uint8(R.paint(canvas, cov, R.random_colours(rng, n)), rng, noise=0.04)


def gen_orientation(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Heading of an arrow head in 8 bins of 45 degrees (image y axis points down)."""
    n = len(labels)
    angle = _uniform_in_bins(rng, labels, 2 * np.pi / 8)
    radius = rng.uniform(7, 11, n)
    cx, cy = (rng.uniform(0.8 * radius, size - 0.8 * radius) for _ in range(2))
    cov = R.shape_coverage(["arrow"] * n, cx, cy, radius, angle, size)
    canvas = R.natural_background(rng, n, size)
    return R.to_uint8(R.paint(canvas, cov, R.random_colours(rng, n)), rng, noise=0.04)


DISTANCE_EDGES = np.arange(6.0, 31.0, 4.0)  # 6 bins: [6, 10), [10, 14), ..., [26, 30) px


def gen_distance(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Distance between the centres of two objects, in 6 bins of 4 px from 6 to 30 px."""
    n, margin = len(labels), 4.0
    dist = _uniform_in_bins(rng, labels, 4.0, offset=DISTANCE_EDGES[0])
    p1, p2 = np.zeros((n, 2)), np.zeros((n, 2))
    todo = np.arange(n)
    while len(todo):
        a = rng.uniform(0, 2 * np.pi, len(todo))
        q1 = rng.uniform(margin, size - margin, (len(todo), 2))
        q2 = q1 + dist[todo, None] * np.stack([np.cos(a), np.sin(a)], axis=1)
        ok = ((q2 >= margin) & (q2 <= size - margin)).all(1)
        p1[todo[ok]], p2[todo[ok]] = q1[ok], q2[ok]
        todo = todo[~ok]
    centres = np.stack([p1, p2], axis=1)
    radii = rng.uniform(2.5, 3.5, (n, 2))
    return R.to_uint8(_paint_objects(rng, R.natural_background(rng, n, size), centres, radii, SIMPLE_SHAPES),
                      rng, noise=0.04)


@dataclass(frozen=True)
class MiniTask:
    info: TaskInfo
    generate: Generator


def _mini(name: str, group: str, num_classes: int, generate: Generator) -> tuple[str, MiniTask]:
    return name, MiniTask(TaskInfo(name, group, num_classes, "mini", MINI_SIZE), generate)


MINI_SPECS: dict[str, MiniTask] = dict([
    _mini("shapes", "Natural", len(SHAPE_CLASSES), gen_shapes),
    _mini("textures", "Natural", len(TEXTURE_CLASSES), gen_textures),
    _mini("cells", "Specialized", 2, gen_cells),
    _mini("landcover", "Specialized", len(LANDCOVER_CLASSES), gen_landcover),
    _mini("count", "Structured", 8, gen_count),
    _mini("location", "Structured", 16, gen_location),
    _mini("orientation", "Structured", 8, gen_orientation),
    _mini("distance", "Structured", len(DISTANCE_EDGES) - 1, gen_distance),
])
MINI_TASKS: dict[str, TaskInfo] = {name: spec.info for name, spec in MINI_SPECS.items()}


# ----------------------------------------------------------------------------- writing
def generate_task(name: str, *, seed: int = 0, sizes: tuple[int, int, int] = DEFAULT_SIZES
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """In-memory images (uint8, N x 32 x 32 x 3) and balanced labels of ``trainval`` and ``test``."""
    spec = MINI_SPECS[name]
    k = spec.info.num_classes
    out = {}
    for stream, n in (("trainval", sizes[0] + sizes[1]), ("test", sizes[2])):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), MINI_VERSION, int(stream == "test")])
        labels = rng.permutation(np.arange(n) % k)
        out[stream] = (spec.generate(rng, labels, MINI_SIZE), labels)
    return out


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _manifest(name: str, seed: int, sizes: tuple[int, int, int]) -> dict:
    info = MINI_TASKS[name]
    return {"suite": "mini", "version": MINI_VERSION, "task": name, "seed": seed, "group": info.group,
            "num_classes": info.num_classes, "img_size": MINI_SIZE,
            "sizes": {"train800": sizes[0], "val200": sizes[1], "test": sizes[2]}}


def _read_manifest(task_dir: Path) -> dict | None:
    try:
        return json.loads((task_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_current(task_dir: Path, expected: dict) -> bool:
    found = _read_manifest(task_dir)
    return found is not None and {k: found.get(k) for k in expected} == expected and all(
        (task_dir / f"{s}.txt").is_file() for s in ("train800", "val200", "train800val200", "test"))


def _write_task(task_dir: Path, name: str, seed: int, sizes: tuple[int, int, int]) -> None:
    data = generate_task(name, seed=seed, sizes=sizes)
    digest = hashlib.sha256()
    lists: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    for stream, (images, labels) in data.items():
        (task_dir / "images" / stream).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            rel = f"images/{stream}/{i:05d}.png"
            blob = _png_bytes(image)
            (task_dir / rel).write_bytes(blob)
            digest.update(rel.encode() + blob)
            split = "test" if stream == "test" else ("train800" if i < sizes[0] else "val200")
            lists[split].append(f"{rel} {int(label)}\n")
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        text = "".join(lines)
        (task_dir / f"{split}.txt").write_text(text)
        digest.update(split.encode() + text.encode())
    manifest = {**_manifest(name, seed, sizes), "content_sha256": digest.hexdigest()}
    (task_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def write_mini_suite(out_dir: str | Path, *, seed: int = 0, tasks: list[str] | tuple[str, ...] | None = None,
                     sizes: tuple[int, int, int] = DEFAULT_SIZES) -> Path:
    """Write the mini suite (or ``tasks`` of it) under ``out_dir`` in the VTAB-1k layout; return ``out_dir``.

    A task whose folder already holds a manifest with the same version, seed and sizes is left as is.
    Each task is written to a temporary folder and renamed into place, so readers never see half a task
    and concurrent writers do not corrupt each other. ``sizes`` (train, val, test) exists for tests and
    quick runs; the VTAB layout's names stay train800/val200 whatever the sizes.
    """
    out = Path(out_dir)
    names = list(MINI_SPECS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in MINI_SPECS]
    if unknown:
        raise KeyError(f"unknown mini task(s) {unknown}; known: {', '.join(MINI_SPECS)}")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        final = out / name
        expected = _manifest(name, seed, sizes)
        if _is_current(final, expected):
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out))
        try:
            _write_task(tmp / name, name, seed, sizes)
            old = None
            if final.exists():
                old = final.with_name(f".{name}.old-{os.getpid()}")
                final.rename(old)
            try:
                (tmp / name).rename(final)
            except OSError:
                if not _is_current(final, expected):  # not a concurrent writer that got there first
                    raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
