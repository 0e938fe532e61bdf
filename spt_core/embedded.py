"""The embedded backbone: a small ViT pretrained by this project on a generated upstream task.

Upstream task (different from every mini-suite task), four heads trained jointly on one image:
``object`` (128 classes = 8 shapes x 4 fill textures x 4 colour families of one large object at a random
position, scale and rotation), ``position`` (3 x 3 cell of the object's centre), ``heading`` (which of 4
quadrants an L-shaped marker points to) and ``distractors`` (0-3 small extra objects), over a cluttered
background. A single object label taught only appearance and left counts, positions and orientations
invisible to a linear probe; the geometric heads make the features carry them. Images are generated on
the fly from a seed, so pretraining needs no download.

``pretrain_embedded`` is reproducible (same seed, steps and thread count -> same weights on the same
torch build) and writes ``spt_mini_vit.safetensors`` plus a JSON recipe next to it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer

from .data import render as R
from .progress import progress_bar

EMBEDDED_NAME = "spt-mini-vit"
EMBEDDED_CONFIG: dict[str, Any] = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0)
ASSET_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_WEIGHTS = ASSET_DIR / "spt_mini_vit.safetensors"
UPSTREAM_VERSION = 2
PRETRAIN_STEPS = 18_000  # 31 min on 2 CPU cores; the geometric heads start learning after ~4k steps

UPSTREAM_SHAPES = ("disk", "square", "triangle", "hexagon", "star", "cross", "ring", "ellipse")
UPSTREAM_FILLS = ("solid", "stripes", "checker", "dots")
UPSTREAM_HUES = (0.0, 0.25, 0.5, 0.75)
UPSTREAM_CLASSES = len(UPSTREAM_SHAPES) * len(UPSTREAM_FILLS) * len(UPSTREAM_HUES)
UPSTREAM_HEADS: dict[str, int] = {"object": UPSTREAM_CLASSES, "position": 9, "heading": 4, "distractors": 4}


def upstream_batch(rng: np.random.Generator, batch: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the upstream task: uint8 images (B, S, S, 3) and labels (B, 4), one column per head
    in ``UPSTREAM_HEADS`` order."""
    obj = rng.integers(0, UPSTREAM_CLASSES, batch)
    shape_i, rest = np.divmod(obj, len(UPSTREAM_FILLS) * len(UPSTREAM_HUES))
    fill_i, hue_i = np.divmod(rest, len(UPSTREAM_HUES))
    heading = rng.integers(0, 4, batch)
    n_distractors = rng.integers(0, 4, batch)

    canvas = R.cluttered_background(rng, batch, size)
    radius = rng.uniform(5, 10, batch)
    cx, cy = (rng.uniform(0.6 * radius, size - 0.6 * radius) for _ in range(2))
    cov = R.shape_coverage(np.array(UPSTREAM_SHAPES)[shape_i], cx, cy, radius,
                           rng.uniform(0, 2 * np.pi, batch), size)
    hue = np.array(UPSTREAM_HUES)[hue_i] + rng.uniform(-0.07, 0.07, batch)
    c0 = R.random_colours(rng, batch, hue=hue, sat=(0.6, 1.0), val=(0.6, 1.0))
    c1 = c0 * rng.uniform(0.2, 0.55, (batch, 1))
    fill = R.two_tone(R.texture(rng, np.array(UPSTREAM_FILLS)[fill_i], size, freq=(0.2, 0.35)), c0, c1)
    canvas = R.paint(canvas, cov, fill)
    # the marker goes on top of the object: hidden under it, its heading could not be learned
    marker = R.shape_coverage(["ell"] * batch, rng.uniform(5, size - 5, batch), rng.uniform(5, size - 5, batch),
                              rng.uniform(4.5, 7, batch), (heading + rng.uniform(-0.25, 0.25, batch)) * np.pi / 2,
                              size)
    canvas = R.paint(canvas, marker, R.random_colours(rng, batch))
    canvas = R.add_distractors(rng, canvas, slots=3, radius=(1.8, 2.8), counts=n_distractors, margin=2.0)
    cell = size / 3
    position = np.minimum(cy // cell, 2).astype(np.int64) * 3 + np.minimum(cx // cell, 2).astype(np.int64)
    return R.to_uint8(canvas, rng, noise=0.03), np.stack([obj, position, heading, n_distractors], axis=1)


def _split_heads(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, sum of head sizes) -> one (B, classes) block per head, in ``UPSTREAM_HEADS`` order."""
    return logits.split(list(UPSTREAM_HEADS.values()), dim=1)


def upstream_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over heads of the label-smoothed cross-entropy; ``logits`` (B, sum of head sizes)."""
    return sum(F.cross_entropy(h, labels[:, i], label_smoothing=0.1) for i, h in enumerate(_split_heads(logits)))


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S), the same as ToTensor + ImageNet Normalize."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def build_embedded_vit(num_classes: int, *, img_size: int | None = None, drop_path_rate: float = 0.0,
                       **kwargs: Any) -> VisionTransformer:
    """The embedded architecture (random init); ``kwargs`` override timm VisionTransformer arguments."""
    cfg = {**EMBEDDED_CONFIG, **kwargs}
    if img_size is not None:
        cfg["img_size"] = img_size
    return VisionTransformer(num_classes=num_classes, drop_path_rate=drop_path_rate, **cfg)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def upstream_accuracy(model: torch.nn.Module, *, seed: int = 0, n: int = 2048, batch: int = 256) -> dict[str, float]:
    """Per-head top-1 accuracy on ``n`` held-out upstream images (their own seed stream)."""
    rng = np.random.default_rng([seed, UPSTREAM_VERSION, 2])
    was_training = model.training
    model.eval()
    correct = np.zeros(len(UPSTREAM_HEADS))
    for start in range(0, n, batch):
        images, labels = upstream_batch(rng, min(batch, n - start))
        heads = _split_heads(model(to_model_input(images)))
        correct += [(h.argmax(1).numpy() == labels[:, i]).sum() for i, h in enumerate(heads)]
    model.train(was_training)
    return {name: round(float(c) / n, 4) for name, c in zip(UPSTREAM_HEADS, correct)}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pretrain_embedded(out_path: str | Path, *, seed: int = 0, steps: int = PRETRAIN_STEPS, batch_size: int = 32,
                      lr: float = 1e-3, weight_decay: float = 0.05, threads: int = 2, eval_images: int = 2048,
                      progress: bool = True) -> dict[str, Any]:
    """Pretrain the embedded ViT on the upstream task; write safetensors + ``<stem>.json``; return the recipe."""
    out_path = Path(out_path)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = build_embedded_vit(sum(UPSTREAM_HEADS.values()))
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr)
        rng = np.random.default_rng([seed, UPSTREAM_VERSION, 1])
        warmup = max(1, steps // 20)
        start, loss_ema = time.perf_counter(), None
        model.train()
        with progress_bar(total=steps, desc="pretrain spt-mini-vit", unit="step", enabled=progress) as bar:
            for step in range(steps):
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, steps, lr, warmup)
                images, labels = upstream_batch(rng, batch_size)
                loss = upstream_loss(model(to_model_input(images)), torch.from_numpy(labels))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_ema:.3f}")
        train_s = time.perf_counter() - start
        acc = upstream_accuracy(model, seed=seed, n=eval_images)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  # one metadata key: safetensors writes a map's keys in no fixed order
                  metadata={"spt": json.dumps({"name": EMBEDDED_NAME, "seed": seed, "steps": steps}, sort_keys=True)})
        tmp.replace(out_path)
        recipe = {
            "name": EMBEDDED_NAME, "architecture": "timm VisionTransformer", "config": EMBEDDED_CONFIG,
            "upstream_task": {"heads": UPSTREAM_HEADS,
                              "object": f"shapes {list(UPSTREAM_SHAPES)} x fills {list(UPSTREAM_FILLS)} x hue "
                                        f"families {list(UPSTREAM_HUES)}",
                              "position": "3 x 3 cell of the object centre", "heading": "L marker, 4 quadrants",
                              "distractors": "0-3 small objects"},
            "upstream_version": UPSTREAM_VERSION, "seed": seed, "steps": steps, "batch_size": batch_size,
            "lr": lr, "weight_decay": weight_decay, "label_smoothing": 0.1, "threads": threads,
            "upstream_eval_images": eval_images, "upstream_accuracy": acc,
            "final_train_loss_ema": round(float(loss_ema), 4), "train_seconds": round(train_s, 1),
            "torch": torch.__version__, "num_params": sum(p.numel() for p in model.parameters()),
            "file": out_path.name, "sha256": file_sha256(out_path),
        }
        out_path.with_suffix(".json").write_text(json.dumps(recipe, indent=2) + "\n")
        return recipe
    finally:
        torch.set_num_threads(prev_threads)
