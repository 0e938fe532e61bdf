"""Baselines as TuningPlans: linear probe, full fine-tuning, BitFit, uniform LoRA, uniform Adapter."""

from __future__ import annotations

from collections.abc import Sequence

from .layout import ModelLayout
from .plan import TensorPlan, TuningPlan, matrix_kind, structured_params

MATRIX_KINDS = ("q", "k", "v", "proj", "fc1", "fc2")


def linear_probe(layout: ModelLayout) -> TuningPlan:
    """Only the classification head is trained."""
    return TuningPlan(layout, {}, meta={"method": "linear"})


def full_finetune(layout: ModelLayout) -> TuningPlan:
    """Every parameter is trained."""
    return TuningPlan(layout, {t.name: TensorPlan("full") for t in layout}, meta={"method": "full"})


def bitfit(layout: ModelLayout) -> TuningPlan:
    """Every bias of the backbone (patch embedding aside) is trained."""
    tensors = {t.name: TensorPlan("full") for t in layout.vectors if t.attr == "bias"}
    return TuningPlan(layout, tensors, meta={"method": "bitfit"})


def _uniform(layout: ModelLayout, kind: str, rank: int, targets: Sequence[str], bits: int | None) -> TuningPlan:
    unknown = set(targets) - set(MATRIX_KINDS)
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {MATRIX_KINDS}, got {list(targets)}")
    tensors = {t.name: TensorPlan(kind, rank=rank, bits=bits) for t in layout.matrices if matrix_kind(t) in targets}
    return TuningPlan(layout, tensors, meta={"method": kind, "rank": rank, "targets": list(targets), "bits": bits})


def uniform_lora(layout: ModelLayout, rank: int = 8, targets: Sequence[str] = ("q", "v"),
                 bits: int | None = None) -> TuningPlan:
    """LoRA of one rank on the chosen matrix kinds of every block (q and v by default, as in LoRA)."""
    return _uniform(layout, "lora", rank, targets, bits)


def uniform_adapter(layout: ModelLayout, rank: int = 8, targets: Sequence[str] = ("fc2",),
                    bits: int | None = None) -> TuningPlan:
    """An Adapter of one rank after the chosen matrix kinds of every block (after fc2 by default)."""
    return _uniform(layout, "adapter", rank, targets, bits)


def rank_for_budget(layout: ModelLayout, budget: int, kind: str = "lora",
                    targets: Sequence[str] = ("q", "v")) -> int:
    """The largest rank whose uniform plan stays within `budget` (at least 1)."""
    matrices = [t for t in layout.matrices if matrix_kind(t) in targets]
    if not matrices:
        raise ValueError(f"the model has no matrices of kinds {list(targets)}")
    rank = 1
    while sum(structured_params(kind, t, rank + 1) for t in matrices) <= budget:
        rank += 1
    return rank


BASELINES = {
    "linear": linear_probe,
    "full": full_finetune,
    "bitfit": bitfit,
    "lora": uniform_lora,
    "adapter": uniform_adapter,
}
