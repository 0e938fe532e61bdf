"""Compare two allocations of one model: where they put structured modules, whole vectors and sparse entries."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .plan import STRUCTURED_KINDS, TuningPlan


@dataclass(frozen=True)
class Overlap:
    """Two sets of positions: their sizes, intersection and Jaccard index (1.0 when both are empty)."""

    ours: int
    theirs: int
    both: int

    @property
    def union(self) -> int:
        return self.ours + self.theirs - self.both

    @property
    def jaccard(self) -> float:
        return self.both / self.union if self.union else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "union": self.union, "jaccard": self.jaccard}


@dataclass(frozen=True)
class Totals:
    """Trainable parameters of one plan (head excluded) by role, and the miss against the budget."""

    sparse: int
    structured: int  # LoRA / Adapter parameters
    whole: int  # tensors tuned whole, always-trained ones (cls_token) included
    total: int
    budget: int | None

    @property
    def miss(self) -> int | None:
        """total - budget (negative: under budget)."""
        return None if self.budget is None else self.total - self.budget

    @property
    def relative_miss(self) -> float | None:
        return None if not self.budget else (self.total - self.budget) / self.budget

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "miss": self.miss, "relative_miss": self.relative_miss}


@dataclass(frozen=True)
class PlanComparison:
    matrices: Overlap  # logical matrices tuned with LoRA / Adapter (whatever the type)
    vectors: Overlap  # tensors tuned whole, always-trained ones excluded
    sparse: Overlap  # (logical tensor, flat index) positions of sparse entries
    ours: Totals
    theirs: Totals
    type_mismatches: int  # matrices structured in both, with different kind or rank

    def to_dict(self) -> dict[str, Any]:
        return {"matrices": self.matrices.to_dict(), "vectors": self.vectors.to_dict(),
                "sparse": self.sparse.to_dict(), "ours": self.ours.to_dict(), "theirs": self.theirs.to_dict(),
                "type_mismatches": self.type_mismatches}


def compare_allocations(ours: TuningPlan, theirs: TuningPlan, *, budget: int | None = None) -> PlanComparison:
    """Overlap of two plans over the same backbone (heads may differ).

    `budget` defaults to each plan's meta["budget"] (so each plan's totals are judged against its own).
    """
    body = _body(ours)
    if body != _body(theirs):
        raise ValueError("the two plans were made for different backbones (their logical tensors differ)")
    always = {t.name for t in ours.layout.always_trained}
    ours_m, theirs_m = _structured(ours), _structured(theirs)
    both_m = ours_m.keys() & theirs_m.keys()
    return PlanComparison(
        matrices=Overlap(len(ours_m), len(theirs_m), len(both_m)),
        vectors=_set_overlap(_whole(ours) - always, _whole(theirs) - always),
        sparse=_sparse_overlap(ours, theirs),
        ours=_totals(ours, budget), theirs=_totals(theirs, budget),
        type_mismatches=sum(ours_m[n] != theirs_m[n] for n in both_m),
    )


def format_comparison(c: PlanComparison, names: tuple[str, str] = ("ours", "theirs")) -> str:
    """A small table for humans."""
    a, b = names
    w = max(12, len(a) + 2, len(b) + 2)
    lines = [f"{'overlap':<16}{a:>{w}}{b:>{w}}{'both':>{w}}{'jaccard':>9}"]
    for label, o in (("structured mats", c.matrices), ("whole tensors", c.vectors), ("sparse entries", c.sparse)):
        lines.append(f"{label:<16}{o.ours:>{w},}{o.theirs:>{w},}{o.both:>{w},}{o.jaccard:>9.3f}")
    if c.type_mismatches:
        lines.append(f"{c.type_mismatches} matrices structured by both with a different type or rank")
    lines.append(f"{'params':<16}{'sparse':>{w}}{'structured':>{w}}{'whole':>{w}}{'total':>{w}}"
                 f"{'budget':>{w}}{'miss':>{w + 8}}")
    for name, t in ((a, c.ours), (b, c.theirs)):
        budget = f"{t.budget:,}" if t.budget is not None else "-"
        miss = f"{t.miss:+,} ({t.relative_miss:+.1%})" if t.budget else "-"
        lines.append(f"{name:<16}{t.sparse:>{w},}{t.structured:>{w},}{t.whole:>{w},}{t.total:>{w},}"
                     f"{budget:>{w}}{miss:>{w + 8}}")
    lines.append("(whole tensors: overlap leaves out the always-trained cls_token; params include it)")
    return "\n".join(lines)


def _body(plan: TuningPlan) -> list[tuple[str, tuple[int, ...]]]:
    return [(t.name, t.shape) for t in plan.layout]


def _structured(plan: TuningPlan) -> dict[str, tuple[str, int]]:
    return {n: (tp.kind, tp.rank) for n, tp in plan.tensors.items() if tp.kind in STRUCTURED_KINDS}


def _whole(plan: TuningPlan) -> set[str]:
    return set(plan.of_kind("full"))


def _set_overlap(ours: set[str], theirs: set[str]) -> Overlap:
    return Overlap(len(ours), len(theirs), len(ours & theirs))


def _sparse_overlap(ours: TuningPlan, theirs: TuningPlan) -> Overlap:
    a = {n: tp.indices for n, tp in ours.tensors.items() if tp.kind == "sparse"}
    b = {n: tp.indices for n, tp in theirs.tensors.items() if tp.kind == "sparse"}
    both = sum(np.intersect1d(a[n].numpy(), b[n].numpy(), assume_unique=True).size for n in a.keys() & b.keys())
    return Overlap(ours.count("sparse"), theirs.count("sparse"), int(both))


def _totals(plan: TuningPlan, budget: int | None) -> Totals:
    b = plan.breakdown
    if budget is None and plan.meta.get("budget") is not None:
        budget = int(plan.meta["budget"])
    return Totals(sparse=b["sparse"], structured=b["lora"] + b["adapter"], whole=b["full"], total=b["total"],
                  budget=budget)
