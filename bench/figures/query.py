"""A DuckDB GROUP BY over 1M result rows through spt_ray's results view."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .common import median



def measure_results_query(*, rows: int = 1_000_000, tasks: int = 19, files_per_task: int = 4, repeats: int = 5,
                          log: Callable[[str], None]) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spt_ray.results import FILE_SCHEMA, duckdb_connect

    rng = np.random.default_rng(0)
    methods = np.array(["spt-lora", "spt-adapter", "linear", "full", "bitfit", "lora", "adapter"])
    with tempfile.TemporaryDirectory(prefix="spt-bench-results-") as tmp:
        t0 = time.perf_counter()
        per_task = rows // tasks
        written = 0
        for ti in range(tasks):
            n_task = per_task + (1 if ti < rows - per_task * tasks else 0)
            for fi, idx in enumerate(np.array_split(np.arange(written, written + n_task), files_per_task)):
                n = idx.size
                cols: dict[str, Any] = {}
                for field in FILE_SCHEMA:
                    cols[field.name] = pa.nulls(n, field.type)
                cols["row_id"] = pa.array([f"{i:024x}" for i in idx], pa.string())
                cols["phase"] = pa.array(np.where(rng.random(n) < 0.9, "search", "final"))
                cols["row_kind"] = pa.array(np.where(rng.random(n) < 0.95, "report", "trial"))
                cols["trial_id"] = pa.array([f"t{i // 100:08d}" for i in idx])
                cols["method"] = pa.array(methods[rng.integers(0, len(methods), n)])
                cols["epoch"] = pa.array(rng.integers(1, 101, n).astype(np.int32))
                cols["val_acc"] = pa.array(rng.random(n))
                cols["val_loss"] = pa.array(rng.random(n) * 3)
                cols["budget"] = pa.array(rng.integers(50_000, 1_000_000, n))
                cols["trainable_params"] = pa.array(rng.integers(50_000, 1_000_000, n))
                cols["train_s"] = pa.array(rng.random(n) * 30)
                cols["status"] = pa.array(np.full(n, "completed"))
                cols["created_at"] = pa.array((1.7e15 + idx).astype("int64"), pa.timestamp("us", tz="UTC"))
                table = pa.table([cols[f.name] for f in FILE_SCHEMA], schema=FILE_SCHEMA)
                d = Path(tmp) / "results" / "sweep=bench" / f"task=task{ti:02d}"
                d.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, d / f"part-{fi:03d}.parquet")
            written += n_task
        gen_s = time.perf_counter() - t0
        con = duckdb_connect(tmp, "bench")
        query = ("SELECT task, method, count(*) AS n, avg(val_acc) AS mean_val_acc, max(val_acc) AS best_val_acc "
                 "FROM results GROUP BY task, method")
        times, result = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = con.execute(query).fetchall()
            times.append(time.perf_counter() - t0)
        # the same aggregate straight on the files, without the view's row_id deduplication
        glob = f"{tmp}/results/sweep=bench/task=*/*.parquet"
        raw_query = (f"SELECT task, method, count(*), avg(val_acc), max(val_acc) FROM read_parquet('{glob}', "
                     "hive_partitioning=true) GROUP BY task, method")
        raw = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            con.execute(raw_query).fetchall()
            raw.append(time.perf_counter() - t0)
        total = sum(r[2] for r in result)
        threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    import duckdb

    log(f"  results query: {median(times):.3f} s median over {repeats} ({total:,} rows, {len(result)} groups; "
        f"without the dedup view {median(raw):.3f} s)")
    return {"s": median(times), "s_all": times, "first_s": times[0], "rows": total, "groups": len(result),
            "files": tasks * files_per_task, "generate_s": gen_s, "no_dedup_s": median(raw),
            "duckdb_version": duckdb.__version__, "duckdb_threads": threads, "query": query}
