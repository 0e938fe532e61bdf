"""Batched numpy rendering of small synthetic images: shapes, textures, backgrounds, noise.

Everything works on a batch ``B`` of square ``S x S`` images in float [0, 1] and takes its
randomness from an explicit ``numpy.random.Generator``, so a seed fixes every pixel.
Shapes are signed-distance functions in a local frame (unit radius); coverage is anti-aliased
over one pixel. Used by the embedded mini suite and by the embedded backbone's upstream task.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Array = np.ndarray
Sdf = Callable[[Array, Array], Array]


# ----------------------------------------------------------------------------- shapes
def _convex_polygon(vertices: list[tuple[float, float]]) -> Sdf:
    """SDF (exact inside, a lower bound outside) of a convex polygon (vertices in either order)."""
    pts = np.asarray(vertices, dtype=np.float64)
    x, y = pts[:, 0], pts[:, 1]
    if (x * np.roll(y, -1) - np.roll(x, -1) * y).sum() < 0:  # clockwise: make it counter-clockwise
        pts = pts[::-1]
    edges = np.roll(pts, -1, axis=0) - pts
    normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    offsets = (normals * pts).sum(axis=1)

    def sdf(u: Array, v: Array) -> Array:
        return np.max(normals[:, 0] * u[..., None] + normals[:, 1] * v[..., None] - offsets, axis=-1)

    return sdf


def _regular(n: int, phase: float = 0.0) -> Sdf:
    angles = phase + np.pi / 2 + 2 * np.pi * np.arange(n) / n
    return _convex_polygon([(float(np.cos(a)), float(np.sin(a))) for a in angles])


def _box(u: Array, v: Array, a: float, b: float) -> Array:
    return np.maximum(np.abs(u) - a, np.abs(v) - b)


SHAPES: dict[str, Sdf] = {
    "disk": lambda u, v: np.hypot(u, v) - 1.0,
    "square": _regular(4, np.pi / 4),
    "triangle": _regular(3),
    "pentagon": _regular(5),
    "hexagon": _regular(6),
    "diamond": _convex_polygon([(1.0, 0.0), (0.0, 0.6), (-1.0, 0.0), (0.0, -0.6)]),
    "star": lambda u, v: np.hypot(u, v) - (0.6 + 0.4 * np.cos(5 * np.arctan2(v, u))),
    "cross": lambda u, v: np.minimum(_box(u, v, 1.0, 0.32), _box(u, v, 0.32, 1.0)),
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.72) - 0.28,
    "ellipse": lambda u, v: 0.5 * (np.hypot(u, v / 0.5) - 1.0),
    "crescent": lambda u, v: np.maximum(np.hypot(u, v) - 1.0, 0.8 - np.hypot(u - 0.5, v)),
    "ell": lambda u, v: np.minimum(_box(u + 0.45, v, 0.3, 0.9), _box(u, v - 0.6, 0.75, 0.3)),
    "arrow": _convex_polygon([(1.0, 0.0), (-0.75, 0.5), (-0.75, -0.5)]),
    "heart": lambda u, v: np.minimum(
        np.minimum(np.hypot(u - 0.38, v + 0.3) - 0.45, np.hypot(u + 0.38, v + 0.3) - 0.45),
        _convex_polygon([(-0.8, -0.1), (0.0, 0.95), (0.8, -0.1)])(u, v),
    ),
}


def pixel_grid(size: int) -> tuple[Array, Array]:
    """(x, y) coordinates of pixel centres, each ``size x size``; y grows downwards."""
    c = np.arange(size, dtype=np.float64) + 0.5
    xx, yy = np.meshgrid(c, c, indexing="xy")
    return xx, yy


def shape_coverage(names: list[str] | Array, cx: Array, cy: Array, radius: Array, angle: Array,
                   size: int) -> Array:
    """Anti-aliased coverage (B, S, S) of one shape per image, centred at (cx, cy), radius in px."""
    xx, yy = pixel_grid(size)
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    r = radius[:, None, None]
    u, v = (c * dx + s * dy) / r, (-s * dx + c * dy) / r
    names = np.asarray(names)
    dist = np.empty_like(u)
    for name in np.unique(names):
        sel = names == name
        dist[sel] = SHAPES[str(name)](u[sel], v[sel])
    return np.clip(0.5 - dist * r, 0.0, 1.0)


# ----------------------------------------------------------------------------- textures
def smooth_noise(rng: np.random.Generator, batch: int, size: int, cells: int) -> Array:
    """Bilinearly upsampled uniform noise on a ``cells x cells`` lattice, shape (B, S, S), in [0, 1]."""
    grid = rng.random((batch, cells + 1, cells + 1))
    pos = (np.arange(size) + 0.5) / size * cells
    lo = np.minimum(pos.astype(int), cells - 1)
    frac = pos - lo
    interp = np.zeros((size, cells + 1))
    interp[np.arange(size), lo] = 1 - frac
    interp[np.arange(size), lo + 1] = frac
    return np.einsum("si,bij,tj->bst", interp, grid, interp)


def _tri(t: Array) -> Array:
    """Triangle wave with period 1 in [0, 1]."""
    return 2 * np.abs(t - np.floor(t + 0.5))


def _texture_one(kind: str, xx: Array, yy: Array, p: dict[str, Array],
                 rng: np.random.Generator) -> Array:
    """Pattern (n, S, S) in [0, 1] for n images of one texture kind, parameters ``p`` of shape (n,)."""
    f, phi, ph = (p[k][:, None, None] for k in ("freq", "angle", "phase"))
    t1 = xx * np.cos(phi) + yy * np.sin(phi)
    t2 = -xx * np.sin(phi) + yy * np.cos(phi)
    if kind == "solid":
        return np.zeros_like(t1)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (f * t1 + ph))
    if kind == "checker":
        return np.clip(0.5 + 3 * np.sin(np.pi * (f * t1 + ph)) * np.sin(np.pi * f * t2), 0, 1)
    if kind == "dots":
        d = np.hypot(_tri(f * t1 + ph), _tri(f * t2)) / (2 * f)
        return np.clip(0.3 / f - d + 0.5, 0, 1)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (f * t1 + ph) + 2.5 * np.sin(2 * np.pi * 0.6 * f * t2))
    if kind == "rings":
        c = 4 + 24 * rng.random((len(f), 2, 1, 1))
        return 0.5 + 0.5 * np.sin(2 * np.pi * (f * np.hypot(xx - c[:, 0], yy - c[:, 1]) + ph))
    if kind == "grid":
        return np.clip(1.5 - np.minimum(_tri(f * t1 + ph), _tri(f * t2)) / f, 0, 1)
    if kind == "zigzag":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (f * t1 + ph + 0.8 * _tri(1.2 * f * t2)))
    if kind == "crosshatch":
        lines = np.minimum(_tri(f * (t1 + t2) / 1.4 + ph), _tri(f * (t1 - t2) / 1.4))
        return np.clip(1.5 - lines / f, 0, 1)
    if kind == "blobs":
        return (smooth_noise(rng, len(f), xx.shape[0], 6) > 0.5).astype(np.float64)
    if kind == "speckle":
        return (rng.random(t1.shape) < 0.35).astype(np.float64)
    if kind == "gradient":
        return np.clip((t1 - t1.min(axis=(1, 2), keepdims=True)) / xx.shape[0] / 1.4, 0, 1)
    raise KeyError(f"unknown texture {kind!r}")


TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker", "dots", "waves", "rings", "grid", "zigzag",
                             "crosshatch", "blobs", "speckle", "gradient")


def texture(rng: np.random.Generator, kinds: list[str] | Array, size: int,
            freq: tuple[float, float] = (0.12, 0.3)) -> Array:
    """One pattern (B, S, S) in [0, 1] per image, random frequency, orientation and phase."""
    kinds = np.asarray(kinds)
    n = len(kinds)
    params = {"freq": rng.uniform(*freq, n), "angle": rng.uniform(0, np.pi, n), "phase": rng.random(n)}
    xx, yy = pixel_grid(size)
    out = np.empty((n, size, size))
    for kind in np.unique(kinds):
        sel = kinds == kind
        out[sel] = _texture_one(str(kind), xx, yy, {k: v[sel] for k, v in params.items()}, rng)
    return out


# ----------------------------------------------------------------------------- colour, composition
def hsv_to_rgb(h: Array, s: Array, v: Array) -> Array:
    """Vectorised HSV -> RGB; inputs in [0, 1] of any equal shape, output shape + (3,)."""
    h6 = (h % 1.0) * 6
    k = (np.array([5.0, 3.0, 1.0]) + h6[..., None]) % 6
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def random_colours(rng: np.random.Generator, n: int, hue: Array | None = None,
                   sat: tuple[float, float] = (0.5, 1.0), val: tuple[float, float] = (0.5, 1.0)) -> Array:
    """(n, 3) RGB colours; hue drawn uniformly unless given."""
    h = rng.random(n) if hue is None else hue
    return hsv_to_rgb(h, rng.uniform(*sat, n), rng.uniform(*val, n))


def two_tone(pattern: Array, c0: Array, c1: Array) -> Array:
    """Blend per-image colours (B, 3) by a pattern (B, S, S) -> (B, S, S, 3)."""
    p = pattern[..., None]
    return c0[:, None, None, :] * (1 - p) + c1[:, None, None, :] * p


def paint(canvas: Array, coverage: Array, fill: Array) -> Array:
    """Alpha-composite ``fill`` (B, S, S, 3) or (B, 3) over ``canvas`` (B, S, S, 3) with coverage (B, S, S)."""
    if fill.ndim == 2:
        fill = fill[:, None, None, :]
    a = coverage[..., None]
    return canvas * (1 - a) + fill * a


def natural_background(rng: np.random.Generator, batch: int, size: int, contrast: float = 0.35) -> Array:
    """Smooth two-colour noise fields, a cheap stand-in for cluttered photo backgrounds."""
    field = smooth_noise(rng, batch, size, int(rng.integers(2, 6)))
    c0 = random_colours(rng, batch, sat=(0.0, 0.6), val=(0.2, 0.9))
    c1 = np.clip(c0 + rng.uniform(-contrast, contrast, (batch, 3)), 0, 1)
    return two_tone(field, c0, c1)


def to_uint8(images: Array, rng: np.random.Generator, noise: float = 0.0) -> Array:
    """Add Gaussian pixel noise, clip and quantise (B, S, S, 3) float -> uint8."""
    if noise > 0:
        images = images + rng.normal(0.0, noise, images.shape)
    return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)


def cluttered_background(rng: np.random.Generator, batch: int, size: int, texture_prob: float = 0.4) -> Array:
    """Smooth colour noise, in a fraction of images half-blended with a low-contrast random texture."""
    textured = rng.random(batch) < texture_prob
    canvas = natural_background(rng, batch, size)
    tex = two_tone(texture(rng, rng.choice(TEXTURES, batch), size),
                   random_colours(rng, batch, sat=(0, 0.5), val=(0.3, 0.8)),
                   random_colours(rng, batch, sat=(0, 0.5), val=(0.3, 0.8)))
    return np.where(textured[:, None, None, None], 0.5 * canvas + 0.5 * tex, canvas)


def add_distractors(rng: np.random.Generator, canvas: Array, *, slots: int = 2, prob: float = 0.5,
                    radius: tuple[float, float] = (2.0, 4.0), counts: Array | None = None,
                    margin: float = 0.0) -> Array:
    """Paint up to ``slots`` small random shapes with centres at least ``margin`` px inside the canvas:
    each present with ``prob``, or exactly ``counts[i]`` of them in image ``i`` when ``counts`` is given."""
    batch, size = canvas.shape[0], canvas.shape[1]
    for slot in range(slots):
        present = rng.random(batch) < prob if counts is None else slot < counts
        cov = shape_coverage(rng.choice(list(SHAPES), batch), rng.uniform(margin, size - margin, batch),
                             rng.uniform(margin, size - margin, batch), rng.uniform(*radius, batch),
                             rng.uniform(0, 2 * np.pi, batch), size)
        canvas = paint(canvas, cov * present[:, None, None], random_colours(rng, batch))
    return canvas
