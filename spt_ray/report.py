"""`spt-ray results ...`: reports over ONE sweep's Parquet results.

`best`, `pareto`, `final` and `plot` go through `spt_ray.selection`, the functions `run_sweep` itself uses
(`best` reads the selection the driver persisted after the search phase), so a report cannot disagree
with the configuration the final phase retrained. Every report is scoped to one sweep: a storage holding
several needs `--sweep`. `query` runs the user's SQL in a DuckDB that cannot reach any file (external
access off and the configuration locked once the `results` view is registered), so a query can read the
results but never write, attach, export or load anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from .result_files import sweep_names
from .results import read_results
from .selection import front_cost, front_with_test, pareto_front, read_selection, select_best, summarize_final
from .storage import Storage

BEST_COLUMNS = ("task", "method", "budget", "alpha", "rank", "lr", "weight_decay", "bits", "trainable_params",
                "val_acc", "trial_id", "test_mean", "test_std", "seeds")
PARETO_COLUMNS = ("task", "trial_id", "method", "budget", "alpha", "rank", "lr", "weight_decay", "bits",
                  "trainable_params", "storage_bytes", "val_acc", "test_mean", "test_std", "seeds", "selected")
FINAL_COLUMNS = ("task", "label", "method", "trainable_params", "budget_ratio", "equal_budget", "test_mean",
                 "test_std", "seeds")


# ---- one sweep ------------------------------------------------------------------------------------
def sweeps_in(storage: Storage) -> list[str]:
    """Names of the sweeps with results under the storage."""
    return sweep_names(storage)


def resolve_sweep(storage: Storage, sweep: str | None) -> str:
    """The sweep a report is about: `--sweep`, or the storage's only one; else a one-line error."""
    names = sweeps_in(storage)
    if sweep is not None and sweep in names:
        return sweep
    there = f"sweeps there: {', '.join(names)}" if names else "run `spt-ray tune` first"
    if sweep is not None:
        raise ValueError(f"no results for sweep {sweep!r} in {storage.root}; {there}")
    if not names:
        raise ValueError(f"no results in {storage.root}; {there}")
    if len(names) > 1:
        raise ValueError(f"{storage.root} holds {len(names)} sweeps ({', '.join(names)}); pick one with --sweep NAME")
    return names[0]


def open_sweep(args: argparse.Namespace) -> tuple[Storage, str, pa.Table]:
    """The storage, the sweep and its results (one row per row_id)."""
    storage = Storage.of(args.storage)
    if storage.local and not Path(storage.root).is_dir():
        raise ValueError(f"--storage {args.storage} does not exist; pass the folder a sweep wrote to")
    sweep = resolve_sweep(storage, args.sweep)
    return storage, sweep, read_results(storage, sweep)


def selection_of(storage: Storage, sweep: str, table: pa.Table) -> dict[str, dict[str, Any]]:
    """The driver's persisted selection; while the search phase still runs, the same function on the trials
    so far (said on stderr)."""
    selection = read_selection(storage, sweep)
    if selection is None:
        print(f"note: sweep {sweep!r} has no saved selection (its search phase has not finished, or it ran "
              "before selections were saved); showing the same selection over its trials so far", file=sys.stderr)
        selection = select_best(table)
    return selection


# ---- the reports (rows + column names) --------------------------------------------------------------
def best_report(storage: Storage, sweep: str, table: pa.Table) -> tuple[list[tuple], list[str]]:
    """Per task: the selected config (on val) and the test mean / std of its final runs."""
    final = summarize_final(table)
    rows = []
    for task, sel in selection_of(storage, sweep, table).items():
        f = final.get(task, {}).get("best")
        test = (f["mean"], f["std"], f["n"]) if f else (None, None, 0)
        rows.append(tuple(sel[c] for c in BEST_COLUMNS[:-3]) + test)
    return rows, list(BEST_COLUMNS)


def pareto_report(storage: Storage, sweep: str, table: pa.Table) -> tuple[list[tuple], list[str]]:
    """Per task, the candidates not dominated in (val_acc, the mode's cost: trainable_params, or storage_bytes
    in multi-objective mode), each with the test accuracy of its final runs; `selected` marks the choice."""
    fronts = pareto_front(table, front_cost(storage, sweep))
    rows = front_with_test(fronts, summarize_final(table), selection_of(storage, sweep, table))
    return [tuple(r[c] for c in PARETO_COLUMNS) for front in rows.values() for r in front], list(PARETO_COLUMNS)


def final_report(storage: Storage, sweep: str, table: pa.Table) -> tuple[list[tuple], list[str]]:
    """Per task and label, the final runs' test accuracy, with the budget ratio to the selected SPT plan."""
    rows = [(task, label, e["method"], e["trainable_params"], e["budget_ratio"], e["equal_budget"], e["mean"],
             e["std"], e["n"])
            for task, labels in summarize_final(table).items()
            for label, e in sorted(labels.items(), key=lambda kv: (kv[0] != "best", kv[0]))]
    return rows, list(FINAL_COLUMNS)


def query_report(table: pa.Table, sql: str) -> tuple[list[tuple], list[str]]:
    """The user's SQL over a view `results` (the sweep's rows), in a DuckDB that cannot reach files."""
    import duckdb

    con = duckdb.connect()
    try:
        con.register("results", table)
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        try:
            cursor = con.execute(sql)
        except Exception as err:  # duckdb's errors are many classes; report them on one line
            raise ValueError(f"query failed: {str(err).splitlines()[0]}") from None
        if cursor.description is None:
            return [], []
        return cursor.fetchall(), [d[0] for d in cursor.description]
    finally:
        con.close()


# ---- output -----------------------------------------------------------------------------------------
def print_table(rows: list[tuple], columns: list[str], fmt: str = "table") -> None:
    """Rows as an aligned table (accuracies in %), CSV or JSON (accuracies as stored: fractions)."""
    if fmt == "json":
        print(json.dumps([dict(zip(columns, r)) for r in rows], indent=1, default=str))
        return
    if fmt == "csv":
        print(",".join(columns))
        for r in rows:
            print(",".join("" if v is None else str(v) for v in r))
        return
    percent = [_is_accuracy(c) for c in columns]
    columns = [f"{c} %" if pct else c for c, pct in zip(columns, percent)]
    cells = [[_cell(100 * v if pct and isinstance(v, float) else v, pct) for v, pct in zip(r, percent)] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)))


def _is_accuracy(column: str) -> bool:
    """Accuracy columns (val_acc, test_mean, max(val_acc), ...): the table shows them in %, the unit of the
    tune summary and the figures; csv and json keep the stored fractions."""
    return "acc" in column or column in ("test_mean", "test_std")


def _cell(v: Any, percent: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if percent else f"{v:.4g}"
    return str(v)


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).isdigit()


# ---- commands ---------------------------------------------------------------------------------------
def cmd_query(args: argparse.Namespace) -> int:
    _, _, table = open_sweep(args)
    print_table(*query_report(table, args.sql), fmt=args.format)
    return 0


def _reporting(report: Callable[[Storage, str, pa.Table], tuple[list[tuple], list[str]]]):
    def command(args: argparse.Namespace) -> int:
        print_table(*report(*open_sweep(args)), fmt=args.format)
        return 0

    return command


cmd_best, cmd_pareto, cmd_final = _reporting(best_report), _reporting(pareto_report), _reporting(final_report)


def cmd_plot(args: argparse.Namespace) -> int:
    from . import plots

    storage, sweep, table = open_sweep(args)
    written = plots.write_all(storage, table, selection_of(storage, sweep, table), Path(args.out),
                              budget=args.budget)
    for path in written:
        print(f"wrote {path}")
    return 0


def add_results_args(results: argparse.ArgumentParser, command: Callable[..., argparse.ArgumentParser]) -> None:
    sub = results.add_subparsers(dest="results_command", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--storage", required=True, help="the sweep storage folder or URI")
        p.add_argument("--sweep", help="the sweep to report on (required when the storage holds several)")
        p.add_argument("--format", choices=("table", "csv", "json"), default="table")
        return p

    p = common(command("query", cmd_query, "run read-only SQL over one sweep's results (DuckDB, a view named "
                       "`results`)", sub))
    p.add_argument("sql", help='e.g. "SELECT task, max(val_acc) FROM results GROUP BY task"')
    common(command("best", cmd_best, "the selected config per task (on val accuracy, as the sweep chose it) and "
                   "its final test score", sub))
    common(command("pareto", cmd_pareto, "the val accuracy / trainable-parameter Pareto front per task", sub))
    common(command("final", cmd_final, "final test accuracy per task and method, with each baseline's budget "
                   "ratio to the selected SPT plan", sub))
    p = common(command("plot", cmd_plot, "write PNGs: Pareto fronts, accuracy by method, sensitivity heatmaps",
                       sub))
    p.add_argument("--out", default="runs/plots", help="output folder")
    p.add_argument("--budget", type=int, help="top-k for the sensitivity heatmap (default: the selected plan's "
                   "trainable parameters)")
