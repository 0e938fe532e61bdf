"""The SPT authors' 266 released allocations (supervised ViT-B/16, alpha 10, rank 8) as TuningPlans.

The data folder (by default the copy shipped in `spt_core/assets/released`) holds `plans.parquet` (one row per plan) and `sparse_entries.parquet` (one row per plan and
tensor holding sparse entries); its README describes every column. The reference names tensors of a ViT with
separate q / k / v Linears (`blocks.N.attn.q.weight`); those are exactly the logical names `ModelLayout`
gives timm's fused `attn.qkv` row blocks, so entries map onto a timm ViT-B/16 without re-indexing.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from .data.vtab import VTAB_TASKS
from .layout import ModelLayout
from .plan import TensorPlan, TuningPlan

RELEASED_DIR_ENV = "SPT_RELEASED_DIR"
PLANS_FILE = "plans.parquet"
SPARSE_FILE = "sparse_entries.parquet"
RELEASED_TYPES = ("adapter", "lora")
RELEASED_RANK = 8
RELEASED_ALPHA = 10.0
RELEASED_BETA = 5.0
RELEASED_BACKBONE = "vit_base_patch16_224"
# Columns of `tuned_matrices`: the matrices of block N, in this order.
MATRIX_COLUMNS = ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.proj.weight", "mlp.fc1.weight",
                  "mlp.fc2.weight")


PACKAGED_DIR = Path(__file__).resolve().parent / "assets" / "released"  # shipped with the package


def default_released_dir() -> Path:
    """`$SPT_RELEASED_DIR`, else the copy shipped in the package (`spt_core/assets/released`, see its
    PROVENANCE.md): every installation has the tables, and none needs the SPT repository's pickles."""
    env = os.environ.get(RELEASED_DIR_ENV)
    if env:
        return Path(env)
    return PACKAGED_DIR


@dataclass(frozen=True)
class ReleasedAllocation:
    """One released plan as published: what the reference tunes and what it says it costs."""

    structured: str
    task: str
    target_m: float
    total_params: int
    sparse_params: int
    structured_params: int
    tuned_matrices: tuple[tuple[int, ...], ...]  # 12 x 6 of 0/1, columns as MATRIX_COLUMNS
    tuned_vectors: tuple[str, ...]
    scored_tensors: tuple[str, ...]  # tensors left for sparse entries (neither structured nor whole)
    sparse: dict[str, np.ndarray]  # reference tensor name -> sorted flat row-major indices
    shapes: dict[str, tuple[int, ...]]  # reference tensor name -> shape, for tensors in `sparse`

    @property
    def target(self) -> int:
        """The target budget in parameters."""
        return round(self.target_m * 1_000_000)

    @property
    def matrix_names(self) -> list[str]:
        """Reference names of the matrices tuned with LoRA / Adapter."""
        return [f"blocks.{b}.{MATRIX_COLUMNS[c]}" for b, row in enumerate(self.tuned_matrices)
                for c, on in enumerate(row) if on]

    def to_plan(self, layout: ModelLayout) -> TuningPlan:
        """This allocation on `layout` (a timm ViT-B/16 with fused qkv, or any layout with the same tensors)."""
        _require_vit_b16(layout)
        tensors: dict[str, TensorPlan] = {t.name: TensorPlan("full") for t in layout.always_trained}
        tensors.update({name: TensorPlan(self.structured, rank=RELEASED_RANK) for name in self.matrix_names})
        tensors.update({name: TensorPlan("full") for name in self.tuned_vectors})
        for name, indices in self.sparse.items():
            if tuple(layout[name].shape) != self.shapes[name]:
                raise ValueError(f"released {self.structured}/{self.task}/{self.target_m}M: {name} has shape "
                                 f"{self.shapes[name]} in the reference but {layout[name].shape} here")
            tensors[name] = TensorPlan("sparse", torch.from_numpy(indices.astype(np.int64, copy=True)))
        meta = {
            "source": "released", "method": f"spt-{self.structured}", "task": self.task,
            "target_m": self.target_m, "budget": self.target, "structured": self.structured,
            "rank": RELEASED_RANK, "alpha": RELEASED_ALPHA, "beta": RELEASED_BETA,
            "reference_total_params": self.total_params, "reference_sparse_params": self.sparse_params,
            "reference_structured_params": self.structured_params,
        }
        return TuningPlan(layout, tensors, meta=meta)


def _require_vit_b16(layout: ModelLayout) -> None:
    """Refuse layouts whose scored tensors (names and shapes) differ from timm's ViT-B/16."""
    have = {t.name: t.shape for t in layout.scored}
    for t in vit_b16_layout().scored:
        if have.get(t.name) != t.shape:
            found = "absent" if t.name not in have else f"of shape {have[t.name]}"
            raise ValueError(f"released plans are for a timm ViT-B/16 ({RELEASED_BACKBONE}); this layout's "
                             f"{t.name} is {found}, not {t.shape}")


@functools.lru_cache(maxsize=32)
def vit_b16_layout(num_classes: int = 1000) -> ModelLayout:
    """The layout of `timm.create_model("vit_base_patch16_224", num_classes=num_classes)` (built on meta)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(RELEASED_BACKBONE, pretrained=False, num_classes=num_classes)
    return ModelLayout.from_model(model)


# ---- the tables ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tables:
    plans: dict[tuple[str, str, float], dict]  # (structured, task, target_m) -> plans.parquet row
    sparse_rows: dict[tuple[str, str, float], list[int]]  # -> rows of sparse_entries.parquet
    tensor: list[str]
    shape: list[list[int]]
    offsets: np.ndarray  # indices of row i: values[offsets[i]:offsets[i + 1]]
    values: np.ndarray


def _resolve_dir(directory: str | os.PathLike | None) -> Path:
    path = Path(directory) if directory is not None else default_released_dir()
    missing = [f for f in (PLANS_FILE, SPARSE_FILE) if not (path / f).is_file()]
    if missing:
        raise ValueError(f"SPT released allocations not found in {path} (missing {', '.join(missing)}); pass "
                         f"directory= or set {RELEASED_DIR_ENV}")
    return path


def _tables(directory: str | os.PathLike | None) -> _Tables:
    path = _resolve_dir(directory).resolve()
    stamp = tuple((path / f).stat().st_mtime_ns for f in (PLANS_FILE, SPARSE_FILE))
    return _read_tables(str(path), stamp)


@functools.lru_cache(maxsize=2)
def _read_tables(path: str, stamp: tuple[int, ...]) -> _Tables:
    plans = {_key(r["structured"], r["task"], r["target_m"]): r
             for r in pq.read_table(Path(path) / PLANS_FILE).to_pylist()}
    sparse = pq.read_table(Path(path) / SPARSE_FILE)
    keys = zip(*(sparse.column(c).to_pylist() for c in ("structured", "task", "target_m")))
    sparse_rows: dict[tuple[str, str, float], list[int]] = {}
    for i, key in enumerate(keys):
        sparse_rows.setdefault(_key(*key), []).append(i)
    indices = sparse.column("indices").combine_chunks()
    offsets = indices.offsets.to_numpy()
    values = indices.values.to_numpy(zero_copy_only=False)
    return _Tables(plans, sparse_rows, sparse.column("tensor").to_pylist(), sparse.column("shape").to_pylist(),
                   offsets, values)


def _key(structured: str, task: str, target_m: float) -> tuple[str, str, float]:
    return str(structured), str(task), float(target_m)


# ---- lookup -------------------------------------------------------------------------------------------
def released_index(directory: str | os.PathLike | None = None) -> list[tuple[str, str, float]]:
    """Every released (structured type, task, target in millions), sorted."""
    return sorted(_tables(directory).plans)


def parse_target(target: float | int | str) -> float:
    """A target budget in millions from 0.4, "0.4M", "400k", "400000" or 400000 (>= 1000 means parameters)."""
    if isinstance(target, str):
        text = target.strip().lower().replace(",", "").replace("_", "")
        scale = {"m": 1.0, "k": 1e-3}.get(text[-1:], None)
        try:
            value = float(text[:-1]) * scale if scale is not None else float(text)
        except ValueError:
            raise ValueError(f"cannot read target {target!r}; write e.g. 0.4M, 400k or 400000") from None
        if scale is not None:
            return value
    else:
        value = float(target)
    return value / 1e6 if value >= 1000 else value


def released_allocation(task: str, target: float | int | str, structured: str = "lora", *,
                        directory: str | os.PathLike | None = None) -> ReleasedAllocation:
    """One released allocation as published (see `released_plan` for the arguments)."""
    if task not in VTAB_TASKS:
        raise ValueError(f"unknown task {task!r}; SPT released plans cover the VTAB-1k tasks: "
                         f"{', '.join(sorted(VTAB_TASKS))}")
    tables = _tables(directory)
    index = tables.plans
    types = sorted({k[0] for k in index})
    if structured not in types:
        raise ValueError(f"unknown structured type {structured!r}; released types: {', '.join(types)}")
    tasks = sorted({k[1] for k in index if k[0] == structured})
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}; released tasks: {', '.join(tasks)}")
    targets = sorted({k[2] for k in index if k[:2] == (structured, task)})
    wanted = parse_target(target)
    match = [t for t in targets if math.isclose(t, wanted, rel_tol=1e-9)]
    if not match:
        raise ValueError(f"no released {structured} plan for {task} at target {target!r}; released targets: "
                         f"{', '.join(f'{t:g}M' for t in targets)}")
    key = (structured, task, match[0])
    row = index[key]
    rows = tables.sparse_rows.get(key, [])
    sparse = {tables.tensor[i]: tables.values[tables.offsets[i]:tables.offsets[i + 1]] for i in rows}
    shapes = {tables.tensor[i]: tuple(tables.shape[i]) for i in rows}
    return ReleasedAllocation(
        structured=structured, task=task, target_m=match[0], total_params=int(row["total_params"]),
        sparse_params=int(row["sparse_params"]), structured_params=int(row["structured_params"]),
        tuned_matrices=tuple(tuple(int(x) for x in r) for r in row["tuned_matrices"]),
        tuned_vectors=tuple(row["tuned_vectors"]), scored_tensors=tuple(row["scored_tensors"]), sparse=sparse,
        shapes=shapes,
    )


def released_plan(task: str, target: float | int | str, structured: str = "lora", *,
                  layout: ModelLayout | None = None, num_classes: int | None = None,
                  directory: str | os.PathLike | None = None) -> TuningPlan:
    """The SPT authors' allocation for `task` at `target` (0.4, "0.4M", 400000...) with `structured` modules.

    `layout` defaults to a timm ViT-B/16 with the task's VTAB class count as head (or `num_classes`), so
    the plan applies to `timm.create_model("vit_base_patch16_224", num_classes=...)`. `directory` defaults
    to `default_released_dir()`. plan.meta records source="released", task, target and the reference totals.
    """
    allocation = released_allocation(task, target, structured, directory=directory)
    if layout is None:
        layout = vit_b16_layout(num_classes if num_classes is not None else VTAB_TASKS[task].num_classes)
    return allocation.to_plan(layout)


def released_target_stats(structured: str | None = None, *,
                          directory: str | os.PathLike | None = None) -> dict[float, dict[str, float]]:
    """How far the released totals land from their targets, per target (millions), over tasks (and types).

    For each target: count, min / median / max of total_params, median_ratio (total / target) and worst_miss,
    the relative miss (total - target) / target of largest magnitude, signed.
    """
    by_target: dict[float, list[int]] = {}
    for (kind, _, target), row in sorted(_tables(directory).plans.items()):
        if structured is None or kind == structured:
            by_target.setdefault(target, []).append(int(row["total_params"]))
    if not by_target:
        raise ValueError(f"unknown structured type {structured!r}; released types: {', '.join(RELEASED_TYPES)}")
    stats = {}
    for target, totals in by_target.items():
        budget = target * 1_000_000
        misses = [(t - budget) / budget for t in totals]
        stats[target] = {"count": len(totals), "min": min(totals), "median": statistics.median(totals),
                         "max": max(totals), "median_ratio": statistics.median(totals) / budget,
                         "worst_miss": max(misses, key=abs)}
    return stats


PLAN_SOURCES = ("released",)


def load_plan_source(source: str, *, task: str | None = None, budget: float | int | str | None = None,
                     structured: str = "lora", layout: ModelLayout | None = None, num_classes: int | None = None,
                     directory: str | os.PathLike | None = None) -> TuningPlan:
    """A plan from a named source ("released": needs task and budget) or from a plan JSON file path."""
    if source == "released":
        if task is None or budget is None:
            raise ValueError("source 'released' needs a task and a budget (e.g. task='cifar', budget='0.4M')")
        return released_plan(task, budget, structured, layout=layout, num_classes=num_classes,
                             directory=directory)
    path = Path(source)
    if path.is_file():
        return TuningPlan.from_json(path.read_text())
    raise ValueError(f"unknown plan source {source!r}; use one of {', '.join(PLAN_SOURCES)} or a plan JSON file")
