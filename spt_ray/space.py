"""The search space of a sweep, declared in ONE place (`SearchSpace`) and overridable by the sweep spec.

A `SearchSpace` holds the ranges; `resolve(total_params)` turns a budget given as a fraction of the
backbone's parameters into absolute counts and gives a `ResolvedSpace`, which is both

* the define-by-run function Optuna samples from (`space(trial) -> config`), and
* the source of its extreme corners (`corners()`: max budget, every structured type, rank and alpha).

`RankingNeeds` turns a space into what the sensitivity store keeps of each map's ranking.

Searched methods are SPT's (`spt-lora`, `spt-adapter`); baselines are fixed configurations run for
comparison (`fixed_configs`), never sampled, so they never enter an Optuna study.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .validate import check_fields, check_keys, finite

SPT_METHODS = ("spt-lora", "spt-adapter")
BASELINE_METHODS = ("linear", "full", "bitfit", "lora", "adapter")
STRUCTURED_OF = {"spt-lora": "lora", "spt-adapter": "adapter"}
BITS_CHOICES = (None, 1, 2)
VIT_B16_PARAMS = 85_798_656  # ViT-B/16 without its head: the backbone the paper's budgets refer to
PAPER_BUDGETS = (400_000, 1_000_000)
PAPER = {"alpha": 10.0, "rank": 8, "lr": 1e-3, "weight_decay": 1e-4}  # SPT's reference recipe (VTAB-1k)


def _clip(value: float, r: "Range") -> float:
    return float(min(max(value, r.low), r.high))


@dataclass(frozen=True)
class Range:
    """A numeric range sampled on a log scale (every searched number here spans decades)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        check_fields(self, "range")  # an infinite end passes `low <= high` and breaks Optuna's sampler
        if not 0 < self.low <= self.high:
            raise ValueError(f"a log range needs 0 < low <= high, got [{self.low}, {self.high}]")

    @classmethod
    def parse(cls, value: Any, what: str) -> "Range":
        if isinstance(value, Range):
            return value
        if isinstance(value, dict):
            check_keys(value, ("low", "high"), what)
            value = [value.get("low"), value.get("high")]
        if isinstance(value, (list, tuple)) and len(value) == 2:
            try:
                return cls(finite(value[0], "low"), finite(value[1], "high"))
            except ValueError as err:
                raise ValueError(f"{what}: {err}") from None
        raise ValueError(f"{what}: expected [low, high] or {{low:, high:}}, got {value!r}")


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of every searched hyper-parameter, SPT's defaults for the embedded mini backbone.

    budget: trainable parameters (head excluded); `budget_unit` "fraction" means a share of the
    backbone's parameters (0.05%..1.2% by default, right for the mini ViT), "params" an absolute count
    (e.g. 5e4..1e6 for ViT-B/16, SPT's 0.05M..1.0M). alpha: SPT's structured-switch divisor. rank: LoRA /
    Adapter rank. lr, weight_decay: AdamW. bits: quantization of the structured (LoRA / Adapter) weights,
    None = float: one value is fixed per sweep, a list (`[null, 2, 1]`) is searched, so the search can
    trade bits for accuracy (with `multi_objective`, against the delta's storage bytes).
    """

    methods: tuple[str, ...] = SPT_METHODS
    budget: Range = Range(0.0005, 0.012)
    budget_unit: str = "fraction"
    alpha: Range = Range(2.0, 40.0)
    rank: tuple[int, ...] = (4, 8, 16)
    lr: Range = Range(1e-4, 1e-2)
    weight_decay: Range = Range(1e-5, 1e-2)
    bits: int | None | tuple[int | None, ...] = None

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in SPT_METHODS]
        if bad or not self.methods:
            raise ValueError(f"searched methods must be a non-empty subset of {SPT_METHODS}, got {list(self.methods)}; "
                             f"baselines {BASELINE_METHODS} go in `baselines` (fixed configs, not searched)")
        if self.budget_unit not in ("fraction", "params"):
            raise ValueError(f"budget_unit must be 'fraction' or 'params', got {self.budget_unit!r}")
        if self.budget_unit == "fraction" and self.budget.high >= 1:
            raise ValueError(f"a fractional budget must stay below 1, got {self.budget.high}")
        if not self.rank or any(int(r) != r or r < 1 for r in self.rank):
            raise ValueError(f"ranks must be integers >= 1, got {list(self.rank)}")
        choices = self.bits if isinstance(self.bits, tuple) else (self.bits,)
        if not choices or any(b not in BITS_CHOICES or isinstance(b, bool) for b in choices) \
                or len(set(choices)) != len(choices):
            raise ValueError(f"bits must be 1, 2 or null (float), or a list of distinct ones such as [null, 2, 1], "
                             f"got {self.bits!r}")

    @property
    def searched_bits(self) -> tuple[int | None, ...]:
        """The bit widths the search samples from; () when bits are fixed per sweep."""
        return self.bits if isinstance(self.bits, tuple) and len(self.bits) > 1 else ()

    @property
    def fixed_bits(self) -> int | None:
        """The one bit width of every run when bits are not searched (None: float, also for baselines when
        bits are searched: they compare against float training)."""
        if isinstance(self.bits, tuple):
            return self.bits[0] if len(self.bits) == 1 else None
        return self.bits

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, base: "SearchSpace | None" = None) -> "SearchSpace":
        """Override `base` (the defaults) with the keys given; unknown keys are an error."""
        base = base or cls()
        if not data:
            return base
        check_keys(data, [f.name for f in fields(cls)], "search space")
        updates: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("budget", "alpha", "lr", "weight_decay"):
                updates[key] = Range.parse(value, f"search space `{key}`")
            elif key in ("methods", "rank"):
                updates[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
            elif key == "bits" and isinstance(value, (list, tuple)):
                updates[key] = tuple(None if b in ("float", 32) else b for b in value)
            else:
                updates[key] = value
        return replace(base, **updates)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolve(self, total_params: int) -> "ResolvedSpace":
        """Absolute budget bounds for a backbone with `total_params` (head excluded) parameters."""
        if self.budget_unit == "fraction":
            low, high = (max(1, round(f * total_params)) for f in (self.budget.low, self.budget.high))
        else:
            low, high = int(self.budget.low), int(self.budget.high)
        if high > total_params:
            raise ValueError(f"the maximum budget {high:,} exceeds the backbone's {total_params:,} parameters")
        return ResolvedSpace(self, int(low), int(high), int(total_params))


@dataclass(frozen=True)
class ResolvedSpace:
    """A SearchSpace with absolute budget bounds: Optuna's define-by-run function (picklable)."""

    space: SearchSpace
    budget_low: int
    budget_high: int
    total_params: int = 0  # the backbone's (head excluded): what paper budgets scale by

    def __call__(self, trial: Any) -> dict[str, Any]:
        s = self.space
        out = {
            "method": trial.suggest_categorical("method", list(s.methods)),
            "budget": trial.suggest_int("budget", self.budget_low, self.budget_high, log=True),
            "alpha": trial.suggest_float("alpha", s.alpha.low, s.alpha.high, log=True),
            "rank": trial.suggest_categorical("rank", list(s.rank)),
            "lr": trial.suggest_float("lr", s.lr.low, s.lr.high, log=True),
            "weight_decay": trial.suggest_float("weight_decay", s.weight_decay.low, s.weight_decay.high, log=True),
        }
        # bits apply to structured weights only: sampled when the method has them (every SPT method does)
        searched = s.searched_bits and out["method"] in STRUCTURED_OF
        return {**out, "bits": trial.suggest_categorical("bits", list(s.searched_bits)) if searched else s.fixed_bits}

    def warm_starts(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The paper's configurations for this backbone, first points of every study (Optuna's enqueue).

        SPT's ViT-B/16 recipe: SPT-LoRA and SPT-Adapter at 0.4M and 1.0M trainable parameters, alpha 10,
        rank 8, lr 1e-3, weight decay 1e-4. Budgets scale by parameter share to other backbones (0.4M of
        ViT-B/16's 85.8M is 0.47%); every value is clipped into this space (rank: the closest of its
        ranks), duplicates after clipping dropped. Order: both methods at 0.4M, then at 1.0M, so `limit`
        keeps the most typical ones. Searched bits start at float (the paper's precision) when offered.
        """
        s, out = self.space, []
        for budget in PAPER_BUDGETS:
            for method in ("spt-lora", "spt-adapter"):
                if method not in s.methods:
                    continue
                share = budget / VIT_B16_PARAMS * (self.total_params or VIT_B16_PARAMS)
                point = {"method": method, "budget": int(min(max(round(share), self.budget_low), self.budget_high)),
                         "alpha": _clip(PAPER["alpha"], s.alpha),
                         "rank": min(s.rank, key=lambda r: abs(r - PAPER["rank"])),
                         "lr": _clip(PAPER["lr"], s.lr), "weight_decay": _clip(PAPER["weight_decay"], s.weight_decay)}
                if s.searched_bits:
                    point["bits"] = None if None in s.searched_bits else s.searched_bits[0]
                if point not in out:
                    out.append(point)
        return out[:limit]

    def corners(self, alpha_points: int = 5) -> list[dict[str, Any]]:
        """Allocation settings that bound how deep into the ranking any sampled trial can reach.

        The maximum budget with every structured type and rank, and alpha at both ends of its range plus
        geometric points between them (the top-k count is not monotone in alpha, so ends alone can miss).
        """
        a = self.space.alpha
        alphas = [a.low * (a.high / a.low) ** (i / (alpha_points - 1)) for i in range(alpha_points)] \
            if a.high > a.low else [a.low]
        return [{"structured": STRUCTURED_OF[m], "rank": int(r), "alpha": float(al), "budget": self.budget_high}
                for m in self.space.methods for r in self.space.rank for al in alphas]


@dataclass(frozen=True)
class RankingNeeds:
    """What the sensitivity store must keep of a ranking: enough entries for any point of `space`.

    Per logical tensor, its top entries down to the deepest switch threshold the space can produce: the
    largest rank, the smallest alpha (divided by `margin`, headroom for a configuration a little outside
    the searched range) and every structured type of the searched methods; vectors by `beta`. Allocation
    over that per-tensor ranking is exact for every budget (see spt_ray.rankings), so no trial of the
    space needs the full map. Budgets and bits do not change thresholds, so they do not enter.
    """

    space: SearchSpace = SearchSpace()
    margin: float = 1.25
    beta: float = 5.0

    def __post_init__(self) -> None:
        if not self.margin >= 1:
            raise ValueError(f"the ranking margin must be >= 1, got {self.margin}")

    def depths(self, layout: Any) -> Any:
        """Entries to keep per scored logical tensor of `layout` (a torch int64 tensor, layout order)."""
        from .rankings import switch_depths

        kinds = tuple(sorted({STRUCTURED_OF[m] for m in self.space.methods}))
        return switch_depths(layout, kinds, max(self.space.rank), self.space.alpha.low / self.margin, self.beta)


def fixed_configs(baselines: tuple[str, ...], *, lr: float, weight_decay: float, rank: int = 8,
                  bits: int | None = None) -> list[dict[str, Any]]:
    """One fixed configuration per baseline (the reference recipe's lr / weight decay, rank 8)."""
    bad = [b for b in baselines if b not in BASELINE_METHODS]
    if bad:
        raise ValueError(f"unknown baselines {bad}; choose from {BASELINE_METHODS}")
    return [{"method": b, "budget": None, "alpha": None, "rank": rank if b in ("lora", "adapter") else None,
             "lr": lr, "weight_decay": weight_decay, "bits": bits} for b in baselines]


__all__ = ["BASELINE_METHODS", "RankingNeeds", "Range", "ResolvedSpace", "SPT_METHODS", "SearchSpace",
           "fixed_configs"]
