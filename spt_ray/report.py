"""`spt-ray results ...`: SQL over the Parquet results, the best config and Pareto front per task, plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable


# The best searched config per task, chosen on validation accuracy only (never on test).
BEST_SQL = """
WITH ranked AS (
  SELECT *, row_number() OVER (PARTITION BY task ORDER BY val_acc DESC NULLS LAST, trainable_params ASC) AS r
  FROM results WHERE phase = 'search' AND row_kind = 'trial' AND val_acc IS NOT NULL
)
SELECT ranked.task, method, budget, alpha, rank, lr, weight_decay, trainable_params, val_acc, trial_id,
       f.test_mean, f.test_std, f.seeds
FROM ranked LEFT JOIN (
  SELECT task, avg(test_acc) AS test_mean, stddev_samp(test_acc) AS test_std, count(*) AS seeds
  FROM results WHERE phase = 'final' AND row_kind = 'final' AND label = 'best' GROUP BY task
) f ON f.task = ranked.task
WHERE r = 1 ORDER BY ranked.task
"""

# Per task, search trials not dominated in (val_acc up, trainable_params down).
PARETO_SQL = """
WITH t AS (
  SELECT task, trial_id, method, budget, alpha, rank, lr, trainable_params, val_acc FROM results
  WHERE phase = 'search' AND row_kind = 'trial' AND val_acc IS NOT NULL
)
SELECT a.* FROM t a WHERE NOT EXISTS (
  SELECT 1 FROM t b WHERE b.task = a.task AND b.val_acc >= a.val_acc AND b.trainable_params <= a.trainable_params
    AND (b.val_acc > a.val_acc OR b.trainable_params < a.trainable_params)
) ORDER BY task, trainable_params
"""

# Best validation accuracy per task and method (SPT methods and baselines side by side).
BY_METHOD_SQL = """
SELECT task, method, max(val_acc) AS val_acc, arg_max(trainable_params, val_acc) AS trainable_params,
       count(*) AS trials
FROM results WHERE phase = 'search' AND row_kind = 'trial' AND val_acc IS NOT NULL
GROUP BY task, method ORDER BY task, method
"""

FINAL_SQL = """
SELECT task, label, method, avg(test_acc) AS test_mean, stddev_samp(test_acc) AS test_std,
       avg(trainable_params)::BIGINT AS trainable_params, count(*) AS seeds
FROM results WHERE phase = 'final' AND row_kind = 'final' GROUP BY task, label, method ORDER BY task, label
"""


def _connect(args: argparse.Namespace):
    from .results import duckdb_connect, read_results
    from .storage import Storage

    storage = Storage.of(args.storage)
    if storage.local and not Path(storage.root).is_dir():
        raise ValueError(f"--storage {args.storage} does not exist; pass the folder a sweep wrote to")
    if read_results(storage, args.sweep).num_rows == 0:
        where = f"sweep {args.sweep!r} in " if args.sweep else ""
        raise ValueError(f"no results for {where}{args.storage}; run `spt-ray tune` first or check --sweep")
    return duckdb_connect(storage, args.sweep)


def print_table(rows: list[tuple], columns: list[str], fmt: str = "table") -> None:
    if fmt == "json":
        print(json.dumps([dict(zip(columns, r)) for r in rows], indent=1, default=str))
        return
    if fmt == "csv":
        print(",".join(columns))
        for r in rows:
            print(",".join("" if v is None else str(v) for v in r))
        return
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)))


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).isdigit()


def run_sql(args: argparse.Namespace, sql: str) -> tuple[list[tuple], list[str]]:
    con = _connect(args)
    try:
        cursor = con.execute(sql)
    except Exception as err:  # duckdb's errors are many classes; report them on one line
        raise ValueError(f"query failed: {str(err).splitlines()[0]}") from None
    return cursor.fetchall(), [d[0] for d in cursor.description]


def cmd_query(args: argparse.Namespace) -> int:
    print_table(*run_sql(args, args.sql), fmt=args.format)
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    print_table(*run_sql(args, BEST_SQL), fmt=args.format)
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    print_table(*run_sql(args, PARETO_SQL), fmt=args.format)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from . import plots

    written = plots.write_all(args, run_sql, Path(args.out))
    for path in written:
        print(f"wrote {path}")
    return 0


def add_results_args(results: argparse.ArgumentParser, command: Callable[..., argparse.ArgumentParser]) -> None:
    sub = results.add_subparsers(dest="results_command", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--storage", required=True, help="the sweep storage folder or URI")
        p.add_argument("--sweep", help="restrict to one sweep (default: all sweeps in the storage)")
        p.add_argument("--format", choices=("table", "csv", "json"), default="table")
        return p

    p = common(command("query", cmd_query, "run SQL over the results (DuckDB, a view named `results`)", sub))
    p.add_argument("sql", help='e.g. "SELECT task, max(val_acc) FROM results GROUP BY task"')
    common(command("best", cmd_best, "the best config per task (by val accuracy) and its final test score", sub))
    common(command("pareto", cmd_pareto, "the accuracy / trainable-parameter Pareto front per task", sub))
    p = common(command("plot", cmd_plot, "write PNGs: Pareto fronts, accuracy by method, sensitivity heatmaps",
                       sub))
    p.add_argument("--out", default="runs/plots", help="output folder")
    p.add_argument("--budget", type=int, help="top-k for the sensitivity heatmap (default: the sweep's largest)")
