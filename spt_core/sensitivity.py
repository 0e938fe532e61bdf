"""Sensitivity maps: per-parameter sum of squared task-loss gradients (SPT, eq. 2)."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .data.suites import PROTOCOL_SPLITS
from .layout import ModelLayout
from .progress import progress_bar


def sensitivity_splits(suite: str | None = None) -> dict[str, list[str]]:
    """The splits a map may be scored on, each with its suites: the search phase's training split of `suite`
    (of every suite when None or unknown), i.e. train800 for VTAB-1k and mini, train for FGVC."""
    allowed: dict[str, list[str]] = {}
    for name, phases in PROTOCOL_SPLITS.items():
        if suite not in PROTOCOL_SPLITS or name == suite:
            allowed.setdefault(phases["search"][0], []).append(name)
    return allowed


def check_sensitivity_split(split: str | None, suite: str | None = None) -> str | None:
    """`split` if a sensitivity map may be scored on it (None: the suite's own), else a one-line ValueError.

    Why only training splits: the map decides which parameters both phases train, so scoring a validation
    or test split would leak evaluation data into parameter placement.
    """
    allowed = sensitivity_splits(suite)
    if split is not None and split not in allowed:
        use = " or ".join(f"{name} ({', '.join(suites)})" for name, suites in allowed.items())
        raise ValueError(f"sensitivity split {split!r} is not allowed: only the search phase's training split may "
                         "be scored (a validation or test split would leak evaluation data into parameter "
                         f"placement); fix: use {use}, or leave the split unset")
    return split


class SensitivityMap(Mapping[str, torch.Tensor]):
    """Scores keyed by real parameter name (each of the parameter's shape), plus metadata.

    Only scored parameters appear (structurable matrices, biases and norm vectors). `layout` tells how
    fused parameters split into logical tensors (timm's qkv into q, k and v).
    """

    def __init__(self, scores: Mapping[str, torch.Tensor], layout: ModelLayout, meta: dict[str, Any] | None = None):
        missing = [p for p in layout.scored_params if p not in scores]
        if missing:
            raise ValueError(f"sensitivity map lacks scored parameters {missing[:3]}...; recompute it for this model")
        self._scores = {p: scores[p] for p in layout.scored_params}
        self.layout = layout
        self.meta: dict[str, Any] = dict(meta or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._scores[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._scores)

    def __len__(self) -> int:
        return len(self._scores)

    @property
    def num_entries(self) -> int:
        return sum(t.numel for t in self.layout.scored)

    def logical(self, name: str) -> torch.Tensor:
        """Scores of one logical tensor (a row block of a fused parameter, or the whole parameter)."""
        t = self.layout[name]
        return self._scores[t.param].narrow(0, t.row_start, t.shape[0])

    def flat_scores(self) -> torch.Tensor:
        """All scored entries in ranking-id order: logical tensors in layout order, row-major inside."""
        return torch.cat([self.logical(t.name).reshape(-1).float().cpu() for t in self.layout.scored])

    def ranking(self, k: int | None = None) -> "Ranking":
        """The top-`k` entries by score (all entries when k is None), ties broken by lower id."""
        return Ranking.from_scores(self.flat_scores(), self.layout, k)

    def save(self, path: str | Path) -> None:
        """Write `<path>` (safetensors) and `<path>.json` (layout + metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        save_file({k: v.contiguous().cpu() for k, v in self._scores.items()}, str(path))
        Path(f"{path}.json").write_text(json.dumps({"layout": self.layout.to_dict(), "meta": self.meta}))

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityMap":
        from safetensors.torch import load_file

        path = Path(path)
        info = json.loads(Path(f"{path}.json").read_text())
        return cls(load_file(str(path)), ModelLayout.from_dict(info["layout"]), info["meta"])


@dataclass
class Ranking:
    """Entries of a sensitivity map in global rank order (score descending, lower id first) and the layout.

    `ids` index the concatenation of the layout's scored logical tensors (see SensitivityMap.flat_scores).
    A truncated ranking is a prefix of the global one, or a subsequence of it: each tensor's top entries
    down to the switch thresholds a search space can produce (meta "tensor_depths"), over which allocation
    is exact for any budget (see spt_ray.rankings). Either is what a trial needs, far smaller than the map.
    """

    ids: torch.Tensor  # int64, best first
    scores: torch.Tensor  # float32 (bfloat16 once compact), descending
    layout: ModelLayout
    num_entries: int  # entries in the full map
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_scores(cls, flat: torch.Tensor, layout: ModelLayout, k: int | None = None,
                    meta: dict[str, Any] | None = None) -> "Ranking":
        n = flat.numel()
        k = n if k is None else max(0, min(int(k), n))
        if k == n or k > n // 4:
            scores, ids = torch.sort(flat, descending=True, stable=True)
        else:
            # Everything scoring at least the k-th value, then a stable sort so ties break by lower id.
            kth = torch.topk(flat, k, sorted=False).values.min() if k else flat.new_tensor(float("inf"))
            cand = torch.nonzero(flat >= kth).squeeze(1)
            scores, order = torch.sort(flat[cand], descending=True, stable=True)
            ids = cand[order]
        return cls(ids[:k].to(torch.int64), scores[:k].float(), layout, n, dict(meta or {}))

    @property
    def truncated(self) -> bool:
        return self.ids.numel() < self.num_entries

    @property
    def nbytes(self) -> int:
        return self.ids.numel() * self.ids.element_size() + self.scores.numel() * self.scores.element_size()

    def compact(self) -> "Ranking":
        """The same ranking as it goes through Ray's object store: int32 ids when they fit, bfloat16 scores.

        A trial needs the ids (their order); the scores only feed plan.meta["score_threshold"], for which
        bfloat16 (fp32's range, 3 significant digits) is enough: 6 bytes per entry instead of 8 (or 12).
        """
        ids = self.ids.to(torch.int32) if self.num_entries < 2**31 else self.ids
        return Ranking(ids, self.scores.to(torch.bfloat16), self.layout, self.num_entries, self.meta)

    def pack(self) -> "PackedRanking":
        """The compact ranking as numpy arrays: what goes through Ray's object store (see PackedRanking)."""
        r = self.compact()
        return PackedRanking(r.ids.contiguous().numpy(), r.scores.contiguous().view(torch.int16).numpy(),
                             self.layout, self.num_entries, dict(self.meta))


@dataclass(frozen=True)
class PackedRanking:
    """A compact Ranking held as numpy arrays (int32 ids, bfloat16 scores stored as their int16 bits).

    Why numpy: Ray deserialises numpy arrays zero-copy, as read-only views of the object store's shared
    memory, so every trial on a node reads one buffer; torch tensors are unpickled into private copies,
    one per `ray.get`. `unpack` wraps the arrays with torch.from_numpy (no copy either); the tensors are
    then read-only, which is fine: allocate only reads a ranking (it indexes, converts and sorts copies).
    """

    ids: np.ndarray
    scores: np.ndarray  # int16: the bits of bfloat16 scores (numpy has no bfloat16)
    layout: ModelLayout
    num_entries: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.scores.nbytes)

    def unpack(self) -> Ranking:
        with warnings.catch_warnings():  # torch warns that the views are read-only; nothing writes into them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            ids, scores = torch.from_numpy(self.ids), torch.from_numpy(self.scores).view(torch.bfloat16)
        return Ranking(ids, scores, self.layout, self.num_entries, dict(self.meta))


def compute_sensitivity(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> SensitivityMap:
    """Per-parameter sum over batches of the squared gradient of the mean cross-entropy loss.

    The model is used exactly as given: its head, its train/eval mode and its device (unless `device`
    is set, which moves the batches only). Scored parameters are unfrozen for the pass, every other one
    is frozen, and the caller's requires_grad flags are restored afterwards. Accumulators are fp32.
    """
    layout = ModelLayout.from_model(model)
    params = dict(model.named_parameters())
    scored = [params[p] for p in layout.scored_params]
    if device is None:
        device = scored[0].device if scored else torch.device("cpu")
    flags = {n: p.requires_grad for n, p in params.items()}
    scored_ids = {id(p) for p in scored}
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in scored]
    samples = seen = 0
    start = time.perf_counter()
    try:
        for p in params.values():
            p.requires_grad_(id(p) in scored_ids)
        with progress_bar(total=num_batches, desc="sensitivity", unit="batch", enabled=progress) as bar:
            for images, labels in batches:
                if num_batches is not None and seen >= num_batches:
                    break
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                loss = F.cross_entropy(model(images), labels)
                grads = torch.autograd.grad(loss, scored)
                torch._foreach_addcmul_(acc, [g.float() for g in grads], [g.float() for g in grads])
                samples += labels.shape[0]
                seen += 1
                bar.update(1)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    if seen == 0:
        raise ValueError("compute_sensitivity got no batches; pass a non-empty loader")
    meta = {"num_batches": seen, "num_samples": samples, "seconds": time.perf_counter() - start,
            "device": str(device)}
    return SensitivityMap(dict(zip(layout.scored_params, acc)), layout, meta)
