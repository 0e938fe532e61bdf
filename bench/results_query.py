"""A 1M-row GROUP BY over the DuckDB `results` view against a raw scan of the same Parquet files.

Rows are unique when written (spt_ray/result_files.py), so the view is a plain scan; this measures that it
stays within 1.5x of reading the files directly. The rows go through the real commit and compaction path
(one file per flush with every task's rows, then one file per task once its phase ends). The ratio is
stored under `dedup_query_vs_raw` in bench/results.json (read-modify-write: other benchmarks own the
other keys).

    python bench/results_query.py [--rows 1000000] [--tasks 19] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import write_merged  # noqa: E402
from spt_ray.result_files import ResultFiles
from spt_ray.results import SCHEMA, duckdb_connect, read_results
from spt_ray.storage import Storage

QUERY = "SELECT task, method, count(*), avg(val_acc), max(val_acc) FROM {} GROUP BY task, method"


def _batch(start: int, n: int, tasks: int, rng: np.random.Generator) -> pa.Table:
    ids = np.arange(start, start + n)
    cols = {name: pa.nulls(n, field.type) for name, field in zip(SCHEMA.names, SCHEMA)}
    cols.update(sweep=pa.array(["bench"] * n), task=pa.array([f"task{i % tasks:02d}" for i in ids]),
                row_id=pa.array([f"{i:024x}" for i in ids]), phase=pa.array(["search"] * n),
                row_kind=pa.array(["report"] * n), status=pa.array(["running"] * n),
                method=pa.array(np.where(ids % 2 == 0, "spt-lora", "spt-adapter")),
                trial_id=pa.array([f"t{i // 10}" for i in ids]), epoch=pa.array(ids % 10 + 1, pa.int32()),
                val_acc=pa.array(rng.random(n)),
                created_at=pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")))
    return pa.table([cols[n] for n in SCHEMA.names], schema=SCHEMA)


def _best(con, queries: list[str], repeat: int) -> list[float]:
    """Fastest of `repeat` runs of each query, interleaved (a loaded machine slows both alike)."""
    times: list[list[float]] = [[] for _ in queries]
    for _ in range(repeat):
        for sql, out in zip(queries, times):
            t0 = time.perf_counter()
            con.execute(sql).fetchall()
            out.append(time.perf_counter() - t0)
    return [min(t) for t in times]


def measure(rows: int = 1_000_000, tasks: int = 19, flush_rows: int = 20_000, repeat: int = 5) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="spt-results-bench-") as tmp:
        storage = Storage.of(tmp)
        files = ResultFiles(storage, "bench", SCHEMA, lambda s, n: SCHEMA.empty_table(), grace_s=0.0)
        for start in range(0, rows, flush_rows):
            files.commit({f"part-{start:09d}.parquet": _batch(start, min(flush_rows, rows - start), tasks, rng)}, ())
        for t in range(tasks):
            files.compact(f"task{t:02d}", "search")
        paths = [f"{files.dir}/{n}" for n in files.files]
        con = duckdb_connect(storage, "bench")
        listing = ", ".join(f"'{p}'" for p in paths)
        raw = f"read_parquet([{listing}], hive_partitioning=false)"
        assert con.execute("SELECT count(*) FROM results").fetchone()[0] == rows
        view_s, raw_s = _best(con, [QUERY.format("results"), QUERY.format(raw)], repeat)
        assert read_results(storage, "bench", dedup=False).num_rows == rows
        return {"rows": rows, "files": len(paths), "view_s": round(view_s, 4), "raw_s": round(raw_s, 4),
                "ratio": round(view_s / raw_s, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--tasks", type=int, default=19)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = ap.parse_args()
    out = measure(args.rows, args.tasks, repeat=args.repeat)
    print(json.dumps(out))
    write_merged(Path(args.out), {"dedup_query_vs_raw": out})  # read-modify-write: other benchmarks' keys stay


if __name__ == "__main__":
    main()
