"""Baselines as TuningPlans: linear probe, full fine-tuning, BitFit, uniform LoRA, uniform Adapter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


# Target sets an equal-budget uniform baseline may use, most conventional first (ties go to the earlier one).
LORA_TARGET_SETS = (("q", "v"), ("q", "k", "v"), ("q", "k", "v", "proj"), MATRIX_KINDS)
ADAPTER_TARGET_SETS = (("fc2",),) + LORA_TARGET_SETS
EQUAL_BUDGET_TOLERANCE = 0.10  # a baseline is "at SPT's budget" only within +-10% of its trainable parameters


@dataclass(frozen=True)
class UniformChoice:
    """A uniform LoRA / Adapter configuration and its exact trainable parameters (head excluded)."""

    kind: str
    rank: int
    targets: tuple[str, ...]
    params: int
    budget: int

    @property
    def ratio(self) -> float:
        """Trainable parameters of this baseline over the budget it was matched to."""
        return self.params / self.budget

    @property
    def equal(self) -> bool:
        return is_equal_budget(self.ratio)


def is_equal_budget(ratio: float | None) -> bool:
    """Whether a baseline / SPT parameter ratio counts as an equal budget (within EQUAL_BUDGET_TOLERANCE)."""
    return ratio is not None and abs(ratio - 1.0) <= EQUAL_BUDGET_TOLERANCE + 1e-12


def uniform_params(layout: ModelLayout, kind: str, rank: int, targets: Sequence[str]) -> int:
    """Exact trainable parameters of `uniform_lora` / `uniform_adapter(layout, rank, targets)`."""
    return sum(structured_params(kind, t, rank) for t in layout.matrices if matrix_kind(t) in targets)


def match_uniform(layout: ModelLayout, budget: int, kind: str,
                  target_sets: Sequence[Sequence[str]] | None = None) -> UniformChoice:
    """The uniform LoRA / Adapter (rank and target matrices) whose trainable parameters come closest to
    `budget`: the equal-budget baseline of an SPT plan with `budget` parameters.

    Why rank AND targets: with one target set the counts step in multiples of the rank-1 cost (2.3k on
    q,v of the mini ViT), so a 4.5k SPT plan would face a 2.3k "equal-budget" LoRA. Closest means the
    smallest |params / budget - 1|, so whenever any candidate lies within EQUAL_BUDGET_TOLERANCE the choice
    does too; ties go to the more conventional target set, then to the lower rank. When none is within the
    tolerance this is still the nearest, and `UniformChoice.equal` says so.
    """
    if budget is None or budget < 1:
        raise ValueError(f"an equal-budget baseline needs a budget >= 1, got {budget}")
    sets = target_sets or (LORA_TARGET_SETS if kind == "lora" else ADAPTER_TARGET_SETS)
    best: tuple[float, int, int] | None = None
    choice: UniformChoice | None = None
    for index, targets in enumerate(sets):
        per_rank = uniform_params(layout, kind, 1, targets) - uniform_params(layout, kind, 0, targets)
        if per_rank <= 0:
            continue
        # params(rank) is affine in rank: only the two ranks around budget / per_rank can be closest
        around = (budget - uniform_params(layout, kind, 0, targets)) // per_rank
        for rank in {max(1, around), max(1, around + 1)}:
            params = uniform_params(layout, kind, rank, targets)
            key = (abs(params / budget - 1.0), index, rank)
            if best is None or key < best:
                best, choice = key, UniformChoice(kind, rank, tuple(targets), params, int(budget))
    if choice is None:
        raise ValueError(f"the model has no matrices of kinds {[list(s) for s in sets]}")
    return choice


BASELINES = {
    "linear": linear_probe,
    "full": full_finetune,
    "bitfit": bitfit,
    "lora": uniform_lora,
    "adapter": uniform_adapter,
}
