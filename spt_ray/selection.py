"""The one model selection of a sweep: which trial is "best", the Pareto front, the final runs, their summary.

Every consumer goes through these functions: `run_sweep` (which persists the selection once the search
phase has finished), `spt-ray results best / pareto / final / plot` and the plots. A second implementation
(SQL in the reports, say) drifted before: it ranked baselines and ASHA-stopped trials next to completed
searched ones and mixed sweeps, so "best" disagreed with the configuration the final phase retrained.

Selection happens on validation only: it reads SELECTION_COLUMNS, which hold no test column, and only
searched search-phase trials that ran all their epochs (status completed). It is per sweep: a table that
holds rows of several sweeps is refused rather than silently pooled.
"""

from __future__ import annotations

import io
import json
import statistics
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from spt_core.baselines import is_equal_budget, match_uniform
from spt_core.layout import ModelLayout

from .results import SCHEMA
from .space import fixed_configs
from .storage import Storage

if TYPE_CHECKING:
    from .spec import SweepSpec

# The only columns model selection may read. No test column: selection happens on validation only.
SELECTION_COLUMNS = ("task", "phase", "row_kind", "status", "searched", "trial_id", "method", "budget", "alpha",
                     "rank", "lr", "weight_decay", "bits", "epoch", "epochs", "val_acc", "val_loss",
                     "trainable_params", "storage_bytes", "label", "seed")
assert not any(c.startswith("test") for c in SELECTION_COLUMNS), "selection must never read a test column"
CONFIG_KEYS = ("method", "budget", "alpha", "rank", "lr", "weight_decay", "bits")
FRONT_COST = {False: "trainable_params", True: "storage_bytes"}  # multi_objective -> the front's second objective
EQUAL_BUDGET_METHODS = ("lora", "adapter")  # baselines the final phase runs at the selected SPT plan's budget
SELECTED_FILE = "selected.parquet"
SELECTED_SCHEMA = pa.schema([SCHEMA.field("sweep")] + [SCHEMA.field(c) for c in SELECTION_COLUMNS]
                            + [pa.field("val_mean", pa.float64()), pa.field("val_runs", pa.int64())])


def _one_sweep(table: pa.Table) -> None:
    """Refuse tables pooling several sweeps: their trials are not comparable candidates of one search."""
    if "sweep" in table.column_names and table.num_rows:
        sweeps = sorted({s for s in table.column("sweep").to_pylist() if s is not None})
        if len(sweeps) > 1:
            raise ValueError(f"the results hold several sweeps ({', '.join(sweeps)}); select within one "
                             "(read_results(storage, sweep))")


def candidates(table: pa.Table) -> list[dict[str, Any]]:
    """The trials selection may choose from: searched search-phase trials that completed all their epochs
    with a val_acc (never a baseline, never an ASHA-stopped or failed trial). SELECTION_COLUMNS only."""
    _one_sweep(table)
    view = table.select(list(SELECTION_COLUMNS))
    assert not any(c.startswith("test") for c in view.column_names)
    return [r for r in view.to_pylist()
            if (r["phase"], r["row_kind"], r["status"]) == ("search", "trial", "completed") and r["searched"]
            and r["val_acc"] is not None]


def select_best(table: pa.Table) -> dict[str, dict[str, Any]]:
    """Per task, the candidate with the highest val_acc; ties go to fewer trainable parameters, then to the
    earlier trial id.

    Robust selection: for a task whose top candidates were re-evaluated (`reeval_configs`: more seeds of
    the same train800 -> val200 run), the choice is among those re-evaluated candidates only, by their mean
    val_acc over every run (the search trial and each re-evaluation seed); `val_runs` says how many."""
    reevals = reeval_values(table)
    best: dict[str, dict[str, Any]] = {}
    for row in candidates(table):
        runs = reevals.get(row["task"], {})
        if runs and row["trial_id"] not in runs:
            continue  # the task was re-evaluated: only its re-evaluated top candidates compete
        values = [row["val_acc"], *runs.get(row["trial_id"], [])]
        row = {**row, "val_mean": sum(values) / len(values), "val_runs": len(values)}
        cur = best.get(row["task"])
        if cur is None or _rank_key(row) > _rank_key(cur):
            best[row["task"]] = row
    return dict(sorted(best.items()))


def _rank_key(row: dict[str, Any]) -> tuple:
    return row["val_mean"], -(row["trainable_params"] or 0), tuple(-ord(c) for c in row["trial_id"])


# ---- robust selection: re-evaluating the top candidates with more seeds ---------------------------------
REEVAL_PREFIX = "reeval-"  # label of a re-evaluation run: reeval-<searched trial id>


def reeval_configs(table: pa.Table, task: str, top: int, seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """Runs re-evaluating `task`'s `top` candidates (highest val_acc, the select_best order) with each of
    `seeds`: the same configuration trained on train800 and scored on val200 again, as search-phase runs
    that no study sees (`searched` False) and no scheduler stops."""
    mine = sorted((r for r in candidates(table) if r["task"] == task),
                  key=lambda r: _rank_key({**r, "val_mean": r["val_acc"]}), reverse=True)[:top]
    return [{**{k: r[k] for k in CONFIG_KEYS}, "task": task, "seed": int(seed), "searched": False,
             "label": f"{REEVAL_PREFIX}{r['trial_id']}"} for r in mine for seed in seeds]


def reeval_values(table: pa.Table) -> dict[str, dict[str, list[float]]]:
    """val_acc of the completed re-evaluation runs: task -> the searched trial they repeat -> values.
    SELECTION_COLUMNS only."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in table.select(list(SELECTION_COLUMNS)).to_pylist():
        if (r["phase"], r["row_kind"], r["status"]) == ("search", "trial", "completed") and r["val_acc"] is not None \
                and (r["label"] or "").startswith(REEVAL_PREFIX):
            out.setdefault(r["task"], {}).setdefault(r["label"][len(REEVAL_PREFIX):], []).append(r["val_acc"])
    return out


def pareto_front(table: pa.Table, cost: str = "trainable_params") -> dict[str, list[dict[str, Any]]]:
    """Per task, the candidates not dominated in (val_acc max, `cost` min), by cost. `cost` is the second
    objective of the sweep's mode (FRONT_COST): trainable parameters, or in multi-objective mode the
    storage bytes of the task delta (which low-bit adapters shrink without changing the parameters)."""
    if cost not in FRONT_COST.values():
        raise ValueError(f"the front's cost must be one of {sorted(FRONT_COST.values())}, got {cost!r}")
    rows = candidates(table)
    fronts: dict[str, list[dict[str, Any]]] = {}
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        front = [r for r in mine if not any(
            o["val_acc"] >= r["val_acc"] and o[cost] <= r[cost]
            and (o["val_acc"] > r["val_acc"] or o[cost] < r[cost]) for o in mine)]
        fronts[task] = sorted(front, key=lambda r: (r[cost], r["trial_id"]))
    return fronts


def front_cost(storage: Storage, sweep: str) -> str:
    """The cost objective of sweep `sweep`'s mode, from the spec.json the driver recorded."""
    path = storage.path("sweeps", sweep, "spec.json")
    multi = storage.exists(path) and bool(json.loads(storage.read_bytes(path)).get("multi_objective"))
    return FRONT_COST[multi]


def front_label(trial_id: str) -> str:
    """The final-phase label of a front configuration other than the selected one ("best")."""
    return f"front-{trial_id}"


def front_with_test(fronts: Mapping[str, list[dict[str, Any]]], final: Mapping[str, Mapping[str, dict[str, Any]]],
                    selected: Mapping[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each front point with the test accuracy of its final runs (`summarize_final`'s output): under "best"
    for the selected trial, under `front_label` for the others; None where it has no final runs."""
    out = {}
    for task, front in fronts.items():
        chosen = (selected.get(task) or {}).get("trial_id")
        rows = []
        for r in front:
            e = final.get(task, {}).get("best" if r["trial_id"] == chosen else front_label(r["trial_id"]))
            rows.append({**r, "selected": r["trial_id"] == chosen, "test_mean": e["mean"] if e else None,
                         "test_std": e["std"] if e else None, "seeds": e["n"] if e else 0})
        out[task] = rows
    return out


# ---- the persisted selection ----------------------------------------------------------------------
def selection_path(storage: Storage, sweep: str) -> str:
    return storage.path("sweeps", sweep, SELECTED_FILE)


def persist_selection(storage: Storage, sweep: str, table: pa.Table) -> dict[str, dict[str, Any]]:
    """Select on `table` (the sweep's results after its search phase) and write the selection whole and
    atomically to `<storage>/sweeps/<sweep>/selected.parquet`, which every report reads."""
    best = select_best(table)
    rows = [{"sweep": sweep, **row} for row in best.values()]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SELECTED_SCHEMA), buf)
    storage.write_bytes(selection_path(storage, sweep), buf.getvalue())
    return best


def read_selection(storage: Storage, sweep: str) -> dict[str, dict[str, Any]] | None:
    """The selection the driver persisted for `sweep`; None when its search phase has not finished."""
    path = selection_path(storage, sweep)
    if not storage.exists(path):
        return None
    table = pq.read_table(io.BytesIO(storage.read_bytes(path)))
    return {r["task"]: {k: v for k, v in r.items() if k != "sweep"} for r in table.to_pylist()}


# ---- the final phase ------------------------------------------------------------------------------
def final_configs(spec: SweepSpec, best: Mapping[str, dict[str, Any]], layouts: Mapping[str, ModelLayout],
                  fronts: Mapping[str, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """Runs of the final phase: (best config of each task + each other point of its Pareto front, when
    `fronts` is given (multi-objective mode) + each baseline) x seeds.

    Uniform LoRA / Adapter baselines get the rank AND target matrices whose trainable parameters come
    closest to the selected SPT plan's (`match_uniform` on the task's layout); `reference_params` (SPT's
    count) travels with every run whose budget refers to it, so the trainable records `budget_ratio`.
    """
    base = fixed_configs(spec.baselines, lr=spec.final_recipe.lr, weight_decay=spec.final_recipe.weight_decay,
                         bits=spec.space.fixed_bits)
    runs = []
    for task in spec.tasks:
        selected = best.get(task)
        labelled: list[tuple[str, dict[str, Any], str | None]] = []
        if selected is not None:
            reference = selected["trainable_params"]
            labelled.append(("best", {**{k: selected[k] for k in CONFIG_KEYS}, "reference_params": reference},
                             selected["trial_id"]))
        for point in (fronts or {}).get(task, []):  # the whole front gets test numbers, not only its top
            if selected is None or point["trial_id"] != selected["trial_id"]:
                labelled.append((front_label(point["trial_id"]), {**{k: point[k] for k in CONFIG_KEYS},
                                 "reference_params": point["trainable_params"]}, point["trial_id"]))
        for cfg in base:
            if selected is not None and cfg["method"] in EQUAL_BUDGET_METHODS:
                choice = match_uniform(layouts[task], reference, cfg["method"])
                cfg = {**cfg, "budget": reference, "rank": choice.rank, "targets": list(choice.targets),
                       "reference_params": reference}
            labelled.append((cfg["method"], cfg, None))
        for label, cfg, source in labelled:
            for seed in spec.final_seeds:
                runs.append({**cfg, "task": task, "label": label, "seed": int(seed), "searched": source is not None,
                             "source_trial": source, "run_id": f"{task}/{label}/seed{seed}"})
    return runs


def summarize_final(table: pa.Table) -> dict[str, dict[str, dict[str, Any]]]:
    """Test accuracy mean / std (sample std, 0 for one seed) per task and label over the completed final runs,
    with the label's `budget_ratio` (its trainable parameters over the selected SPT plan's; None where no
    budget applies) and `equal_budget` (the ratio is within +-10%: only then is it an equal-budget run;
    None where no budget applies)."""
    _one_sweep(table)
    rows = [r for r in table.to_pylist() if r["phase"] == "final" and r["row_kind"] == "final"
            and r["status"] == "completed"]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r["task"], r["label"], r["seed"])):
        entry = out.setdefault(r["task"], {}).setdefault(r["label"], {
            "method": r["method"], "trainable_params": r["trainable_params"], "storage_bytes": r["storage_bytes"],
            "budget_ratio": r["budget_ratio"], "seeds": [], "test_acc": []})
        entry["seeds"].append(r["seed"])
        entry["test_acc"].append(r["test_acc"])
    for labels in out.values():
        for e in labels.values():
            e["n"] = len(e["test_acc"])
            e["mean"] = statistics.fmean(e["test_acc"])
            e["std"] = statistics.stdev(e["test_acc"]) if e["n"] > 1 else 0.0
            e["equal_budget"] = None if e["budget_ratio"] is None else is_equal_budget(e["budget_ratio"])
    return out


__all__ = ["CONFIG_KEYS", "FRONT_COST", "REEVAL_PREFIX", "SELECTION_COLUMNS", "candidates", "final_configs",
           "front_cost", "front_label", "front_with_test", "pareto_front", "persist_selection", "read_selection",
           "reeval_configs", "reeval_values", "select_best", "summarize_final"]
