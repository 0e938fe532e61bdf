"""SPT's budgeted allocation: top-k sensitive entries -> sparse entries, LoRA/Adapter matrices, whole vectors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layout import ModelLayout
from .plan import STRUCTURED_KINDS, TensorPlan, TuningPlan, structured_params
from .sensitivity import Ranking, SensitivityMap

BUDGET_TOLERANCE = 0.05  # a plan lands in [budget * (1 - tol), budget] whenever some k allows it


@dataclass(frozen=True)
class _Costs:
    """Per scored logical tensor: its switch threshold and what it costs once switched."""

    ends: torch.Tensor  # cumulative entry counts: ids in [ends[i-1], ends[i]) belong to tensor i
    threshold: torch.Tensor  # n >= threshold switches the tensor to structured (matrix) / whole (vector)
    cost: torch.Tensor  # P_struct for a matrix, its length for a vector
    base: int  # always-trained parameters (cls_token)
    eligible: int  # base + every scored entry


def _costs(layout: ModelLayout, structured: str, rank: int, alpha: float, beta: float) -> _Costs:
    scored = layout.scored
    cost, threshold = [], []
    for t in scored:
        if t.role == "matrix":
            p = structured_params(structured, t, rank)
            cost.append(p)
            threshold.append(max(1, math.ceil(p / alpha)))
        else:
            cost.append(t.numel)
            threshold.append(max(1, math.ceil(t.numel / beta)))
    numels = torch.tensor([t.numel for t in scored], dtype=torch.int64)
    base = sum(t.numel for t in layout.always_trained)
    return _Costs(torch.cumsum(numels, 0), torch.tensor(threshold), torch.tensor(cost), base,
                  base + int(numels.sum()))


def _owners(ids: torch.Tensor, c: _Costs) -> tuple[torch.Tensor, torch.Tensor]:
    """For each ranked entry: the index of its tensor and its 1-based rank among that tensor's entries."""
    owner = torch.searchsorted(c.ends, ids.to(torch.int64), right=True)
    order = torch.sort(owner, stable=True).indices
    _, counts = torch.unique_consecutive(owner[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    occurrence = torch.empty_like(owner)
    occurrence[order] = torch.arange(owner.numel()) - starts + 1
    return owner, occurrence


def _totals(owner: torch.Tensor, occurrence: torch.Tensor, c: _Costs, capped: torch.Tensor) -> torch.Tensor:
    """Trainable parameters of the plan built from the top-k entries, for every k = 0..len(owner).

    An entry below its tensor's threshold adds 1 (sparse); the one reaching it switches the tensor, adding
    P_struct minus the sparse entries it replaces; later ones add nothing. A capped tensor never switches:
    its entries from the threshold on are skipped.
    """
    thr, cost = c.threshold[owner], c.cost[owner]
    switch = torch.where(capped[owner], 0, cost - thr + 1)
    step = torch.where(occurrence < thr, 1, torch.where(occurrence == thr, switch, 0))
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(step, 0)]) + c.base


def _select(owner: torch.Tensor, occurrence: torch.Tensor, c: _Costs, budget: int, fill: bool):
    """The prefix length k, the capped tensors, the total of the chosen plan, and whether the walk used up
    the ranking (a longer ranking might then do better).

    First the best prefix of the ranking (SPT's rule). If its total misses the budget by more than the
    tolerance because the next entry would switch a tensor whose P_struct does not fit, that tensor is
    capped (kept sparse below its threshold) and the walk goes on with the following entries, until the
    total is within tolerance or the ranking is exhausted.
    """
    capped = torch.zeros(c.threshold.numel(), dtype=torch.bool)
    totals = _totals(owner, occurrence, c, capped)
    switch = c.cost - c.threshold + 1  # what each tensor's switching entry adds
    rising = bool((switch >= 0).all())  # then no step is negative and the totals never decrease
    at = torch.nonzero(occurrence == c.threshold[owner]).squeeze(1)
    switch_at = torch.full_like(c.threshold, -1).index_put_((owner[at],), at)  # each tensor's switching entry
    while True:
        first, last, best = _best_prefix(totals, budget, rising)
        if not fill or best >= (1 - BUDGET_TOLERANCE) * budget or last == owner.numel():
            return first, capped, best, last == owner.numel()
        j = int(owner[last])
        # Capping j turns its switching entry's step into 0: every later total drops by what it added (the
        # same totals `_totals` computes from scratch with the new caps, without another pass over the ranking).
        if not capped[j] and switch_at[j] >= 0:
            totals[int(switch_at[j]) + 1:] -= int(switch[j])
        capped[j] = True


def _best_prefix(totals: torch.Tensor, budget: int, rising: bool) -> tuple[int, int, int]:
    """The highest total within budget, and the first and last prefix length reaching it. Entries after the
    first k reaching it add nothing (their tensors are switched or capped), so the plan is the same for every
    tied k: the smallest is reported; the last one shows what overshoots."""
    if rising:  # sorted totals: binary searches instead of passes
        last = int(torch.searchsorted(totals, torch.tensor(budget), right=True)) - 1
        best = int(totals[last])
        return int(torch.searchsorted(totals, torch.tensor(best))), last, best
    valid = totals <= budget
    best = int(totals[valid].max())
    ties = torch.nonzero(valid & (totals == best)).squeeze(1)
    return int(ties[0]), int(ties[-1]), best


def allocate(
    sensitivity: SensitivityMap | Ranking,
    budget: int | float,
    *,
    structured: str = "lora",
    rank: int = 8,
    alpha: float = 10.0,
    beta: float = 5.0,
    bits: int | None = None,
) -> TuningPlan:
    """SPT allocation of `budget` trainable parameters (head excluded, cls_token included).

    Entries are ranked globally by sensitivity; for the top-k, a matrix holding n_W >= P_struct / alpha of
    them is tuned with `structured` (LoRA or Adapter of `rank`) and charged P_struct, a vector holding
    n >= len / beta is tuned whole, and every other top-k entry is a sparse delta. k is the one whose
    total lands closest to the budget from below. When that misses the budget by more than 5% (the next
    switch costs more than is left), the tensor whose switch overshoots is kept sparse and the walk goes on,
    so the plan lands within 5% under the budget whenever the model allows it.
    """
    if structured not in STRUCTURED_KINDS:
        raise ValueError(f"unknown structured type {structured!r}; use 'lora' or 'adapter'")
    if int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank}")
    if not alpha > 0 or not beta > 0:
        raise ValueError(f"alpha and beta must be positive, got alpha={alpha}, beta={beta}")
    layout = sensitivity.layout
    costs = _costs(layout, structured, int(rank), float(alpha), float(beta))
    budget = int(budget)
    if budget < 1:
        raise ValueError(f"budget must be at least 1 parameter, got {budget}")
    if budget < costs.base:
        raise ValueError(f"budget {budget:,} is below the {costs.base:,} always-trained parameters (cls_token); "
                         f"raise the budget")
    if budget > costs.eligible:
        raise ValueError(f"budget {budget:,} exceeds the {costs.eligible:,} tunable parameters of this model; "
                         f"use full fine-tuning instead")

    ranking, owner, occurrence, k, capped, total, exhausted = _search(sensitivity, budget, costs, fill=alpha >= 1)
    saturated = bool(((torch.bincount(owner, minlength=capped.numel()) >= costs.threshold) | capped).all())
    if ranking.truncated and exhausted and not saturated and total < (1 - BUDGET_TOLERANCE) * budget:
        raise ValueError(f"the ranking holds only the top {k:,} entries, which reach {total:,} of the {budget:,} "
                         f"budget; build it for a larger maximum budget")
    keep = ~(capped[owner[:k]] & (occurrence[:k] >= costs.threshold[owner[:k]]))
    plan = _build_plan(layout, ranking.ids[:k][keep].to(torch.int64), owner[:k][keep], costs, structured,
                       int(rank), bits)
    plan.meta.update(method=f"spt-{structured}", budget=budget, alpha=float(alpha), beta=float(beta),
                     rank=int(rank), bits=bits, num_top_entries=k, capped=int(capped.sum()),
                     score_threshold=float(ranking.scores[k - 1]) if k else None)
    assert plan.trainable_params == total, (plan.trainable_params, total)
    return plan


def _search(sensitivity: SensitivityMap | Ranking, budget: int, costs: _Costs, fill: bool):
    """Rank enough entries for the selection to settle (or all of them), then select."""
    if isinstance(sensitivity, Ranking):
        owner, occurrence = _owners(sensitivity.ids, costs)
        return (sensitivity, owner, occurrence, *_select(owner, occurrence, costs, budget, fill))
    flat = sensitivity.flat_scores()
    n = min(flat.numel(), max(4096, 2 * budget))
    while True:
        ranking = Ranking.from_scores(flat, sensitivity.layout, n)
        owner, occurrence = _owners(ranking.ids, costs)
        k, capped, total, exhausted = _select(owner, occurrence, costs, budget, fill)
        if not exhausted or n == flat.numel():
            return ranking, owner, occurrence, k, capped, total, exhausted
        n = min(flat.numel(), 4 * n)


def _build_plan(layout: ModelLayout, ids: torch.Tensor, owner: torch.Tensor, costs: _Costs,
                structured: str, rank: int, bits: int | None) -> TuningPlan:
    scored = layout.scored
    counts = torch.bincount(owner, minlength=len(scored))
    switched = counts >= costs.threshold
    ids_sorted = torch.sort(ids).values
    starts = costs.ends - torch.tensor([t.numel for t in scored])
    lo, hi = torch.searchsorted(ids_sorted, starts).tolist(), torch.searchsorted(ids_sorted, costs.ends).tolist()
    tensors: dict[str, TensorPlan] = {t.name: TensorPlan("full") for t in layout.always_trained}
    for i in torch.nonzero(counts).squeeze(1).tolist():
        t = scored[i]
        if bool(switched[i]):
            tensors[t.name] = TensorPlan(structured, rank=rank, bits=bits) if t.role == "matrix" else TensorPlan("full")
        else:
            tensors[t.name] = TensorPlan("sparse", ids_sorted[lo[i]:hi[i]] - starts[i])
    return TuningPlan(layout, tensors)
