"""Sweep results as Parquet: one fixed, typed schema; hive-partitioned files; streamed while Tune runs.

Layout: `<storage>/results/sweep=<name>/task=<task>/part-<time>-<uuid>.parquet`. `sweep` and `task` live
in the path (hive partitions), every other column in the files, with the types of `FILE_SCHEMA` (no dict
serialised as a string: every searched parameter, metric, timing and package version is its own column).

Writing. Rows come from a Tune Callback running on Tune's event loop, which only builds a dict and puts
it on a queue; a background thread batches them and writes one file per (task, flush). A file is
written under a hidden temporary name and renamed (locally) or uploaded whole (object stores), so a
reader never sees half a file and can query while the sweep runs.

No duplicates. Every row has a deterministic `row_id` (sweep, phase, run, row kind, epoch). The writer
loads the ids already stored for the sweep when it starts and skips rows it has written before, so
re-running the reconciliation or resuming a sweep adds only what is missing; and the readers
(`read_results`, the DuckDB `results` view) also keep one row per `row_id` (the first written), which
covers the one window the writer cannot see: two drivers writing the same sweep at the same time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from ray.tune import Callback

from .storage import Storage

logger = logging.getLogger(__name__)

PARTITION_SCHEMA = pa.schema([("sweep", pa.string()), ("task", pa.string())])
FILE_SCHEMA = pa.schema([
    ("row_id", pa.string()),
    ("phase", pa.string()),  # search | final
    ("suite", pa.string()),
    ("trial_id", pa.string()),  # Tune's trial id
    ("run_id", pa.string()),  # stable identity of the run: the trial id (search), task/label/seed (final)
    ("row_kind", pa.string()),  # report (one per epoch) | trial (search trial summary) | final (final run)
    ("iteration", pa.int32()),
    ("epoch", pa.int32()),
    ("epochs", pa.int32()),  # epochs the run was configured for
    ("train_loss", pa.float64()),
    ("train_acc", pa.float64()),
    ("val_acc", pa.float64()),
    ("val_loss", pa.float64()),
    ("test_acc", pa.float64()),
    ("test_loss", pa.float64()),
    ("method", pa.string()),
    ("label", pa.string()),  # "best" for the selected config in the final phase, the method for baselines
    ("searched", pa.bool_()),
    ("budget", pa.int64()),
    ("alpha", pa.float64()),
    ("rank", pa.int32()),
    ("lr", pa.float64()),
    ("weight_decay", pa.float64()),
    ("bits", pa.int32()),
    ("seed", pa.int64()),
    ("trainable_params", pa.int64()),
    ("storage_bytes", pa.int64()),
    ("budget_ratio", pa.float64()),  # final runs: trainable_params / the selected SPT plan's (null: no budget)
    ("backbone", pa.string()),
    ("backbone_hash", pa.string()),
    ("sensitivity_key", pa.string()),
    ("ranking_object", pa.string()),  # ObjectRef id of the ranking the trial read
    ("ranking_bytes", pa.int64()),  # bytes of sensitivity data the trial read
    ("plan_source", pa.string()),  # ranking (object-store prefix) | full-map (deep config) | layout (baseline)
    ("status", pa.string()),  # running | completed | stopped (early, by ASHA) | error
    ("restarts", pa.int32()),  # times the run was started again (driver killed, node lost, error retried)
    ("sensitivity_s", pa.float64()),
    ("setup_s", pa.float64()),
    ("train_s", pa.float64()),
    ("eval_s", pa.float64()),
    ("checkpoint_s", pa.float64()),
    ("wall_s", pa.float64()),
    ("host", pa.string()),
    ("device", pa.string()),
    ("node_id", pa.string()),
    ("spt_ray_version", pa.string()),
    ("torch_version", pa.string()),
    ("timm_version", pa.string()),
    ("ray_version", pa.string()),
    ("optuna_version", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])
SCHEMA = pa.schema(list(PARTITION_SCHEMA) + list(FILE_SCHEMA))  # what readers return
COLUMNS = tuple(SCHEMA.names)
TOTALS = ("setup_s", "train_s", "eval_s", "checkpoint_s", "wall_s")  # per-epoch in reports, summed in trial rows


def results_root(storage: Storage) -> str:
    return storage.path("results")


def row_id(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:24]


# ---- rows ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowContext:
    """Sweep-level facts every row carries (the trial reports the rest)."""

    sweep: str
    phase: str
    suite: str
    backbone: str
    backbone_hash: str
    sensitivity_keys: tuple[tuple[str, str], ...] = ()

    def key_of(self, task: str) -> str | None:
        return dict(self.sensitivity_keys).get(task)


def make_row(ctx: RowContext, result: dict[str, Any], *, row_kind: str, status: str,
             trial_id: str | None = None) -> dict[str, Any]:
    """One Parquet row from a Tune result dict (metrics + `config`), typed by SCHEMA on write."""
    config = result.get("config", {}) or {}
    task = config.get("task") or result.get("task")
    run_id = config.get("run_id") or trial_id or result.get("trial_id")
    epoch = result.get("epoch")
    summary = row_kind != "report"
    row: dict[str, Any] = {name: None for name in COLUMNS}
    row.update({k: result.get(k) for k in FILE_SCHEMA.names if k in result})
    row.update({k: config.get(k) for k in ("method", "budget", "alpha", "rank", "lr", "weight_decay", "bits",
                                           "seed", "label", "searched") if k in config})
    if summary:  # the run's totals, not the last epoch's
        row.update({k: result.get(f"{k}_total") for k in TOTALS})
    row.update(sweep=ctx.sweep, task=task, phase=ctx.phase, suite=ctx.suite, backbone=ctx.backbone,
               backbone_hash=ctx.backbone_hash, sensitivity_key=ctx.key_of(task) or result.get("sensitivity_key"),
               trial_id=trial_id or result.get("trial_id"), run_id=run_id, row_kind=row_kind, status=status,
               iteration=result.get("training_iteration"), created_at=datetime.now(timezone.utc))
    if row_kind != "final":
        row["test_acc"] = row["test_loss"] = None  # only final runs may carry test numbers
    row["row_id"] = row_id(ctx.sweep, ctx.phase, run_id, row_kind, epoch if row_kind == "report" else "")
    return row


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=FILE_SCHEMA)


# ---- the writer ---------------------------------------------------------------------------------
class ResultsWriter:
    """Batches rows on a background thread into Parquet files; skips row ids already stored.

    One writer per (storage, sweep) and process (`ResultsWriter.shared`): the Tune callback Tune
    unpickles on `Tuner.restore` and the driver reach the same writer.
    """

    _shared: dict[tuple[str, str], "ResultsWriter"] = {}
    _shared_lock = threading.Lock()

    def __init__(self, storage: Storage, sweep: str, *, flush_s: float = 2.0, max_rows: int = 512):
        self.storage, self.sweep = storage, sweep
        self.flush_s, self.max_rows = flush_s, max_rows
        self.queue: queue.Queue = queue.Queue()
        self.written_ids: set[str] = set()
        self.files_written = self.rows_written = self.rows_skipped = 0
        self.errors: list[str] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, storage: Storage, sweep: str) -> "ResultsWriter":
        with cls._shared_lock:
            w = cls._shared.get((storage.root, sweep))
            if w is None:
                w = cls._shared[(storage.root, sweep)] = cls(storage, sweep)
            w.start()
            return w

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self.written_ids |= stored_row_ids(self.storage, self.sweep)
            self._thread = threading.Thread(target=self._run, name=f"spt-results-{self.sweep}", daemon=True)
            self._thread.start()

    def put(self, row: dict[str, Any]) -> None:
        self.queue.put(row)

    def flush(self, timeout: float = 60.0) -> None:
        """Block until every row queued so far is on storage."""
        done = threading.Event()
        self.queue.put(done)
        if self._thread is None or not done.wait(timeout):
            raise TimeoutError(f"results writer of {self.sweep!r} did not flush within {timeout}s")
        if self.errors:
            raise RuntimeError(f"results writer failed: {self.errors[-1]}")

    def close(self) -> None:
        """Flush and stop; the thread stops and the writer is released even when the last write failed."""
        try:
            if self._thread is not None and self._thread.is_alive():
                self.flush()
        finally:
            if self._thread is not None and self._thread.is_alive():
                self.queue.put(None)
                self._thread.join(timeout=30)
            with self._shared_lock:
                if self._shared.get((self.storage.root, self.sweep)) is self:
                    del self._shared[(self.storage.root, self.sweep)]

    def _run(self) -> None:
        pending: list[dict[str, Any]] = []
        last = time.monotonic()
        while True:
            try:
                item = self.queue.get(timeout=max(0.05, self.flush_s - (time.monotonic() - last)))
            except queue.Empty:
                item = ...
            if isinstance(item, dict):
                pending.append(item)
            stop = item is None
            due = stop or isinstance(item, threading.Event) or len(pending) >= self.max_rows \
                or time.monotonic() - last >= self.flush_s
            if due:
                if pending:
                    self._write(pending)
                    pending = []
                last = time.monotonic()
            if isinstance(item, threading.Event):
                item.set()
            if stop:
                return

    def _write(self, rows: list[dict[str, Any]]) -> None:
        fresh: dict[str, dict[str, Any]] = {}
        for r in rows:
            if r["row_id"] in self.written_ids or r["row_id"] in fresh:
                self.rows_skipped += 1
            else:
                fresh[r["row_id"]] = r
        by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in fresh.values():
            by_task[r["task"]].append(r)
        for task, task_rows in by_task.items():
            try:
                buf = io.BytesIO()
                pq.write_table(_table(task_rows), buf, compression="zstd")
                name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
                self.storage.write_bytes(self.storage.path("results", f"sweep={self.sweep}", f"task={task}", name),
                                         buf.getvalue())
            except Exception as err:  # keep the thread alive; flush() reports it (write_bytes left no temp file)
                logger.error("writing %d result rows of task %s failed: %s", len(task_rows), task, err)
                self.errors.append(f"{type(err).__name__}: {err}")
                continue
            self.written_ids.update(r["row_id"] for r in task_rows)
            self.files_written += 1
            self.rows_written += len(task_rows)


# ---- the Tune callback --------------------------------------------------------------------------
class ResultsCallback(Callback):
    """Turns Tune events into rows; never writes on Tune's loop (the writer thread does).

    Picklable (Tuner pickles its run config): the writer is looked up per process, not stored.
    """

    def __init__(self, storage_root: str, ctx: RowContext):
        self.storage_root, self.ctx = storage_root, ctx

    @property
    def writer(self) -> ResultsWriter:
        return ResultsWriter.shared(Storage.of(self.storage_root), self.ctx.sweep)

    def setup(self, **info: Any) -> None:
        self.writer.start()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" in result:
            self.writer.put(make_row(self.ctx, result, row_kind="report", status="running", trial_id=trial.trial_id))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._summary(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._summary(trial, error=True)

    def _summary(self, trial: Any, error: bool) -> None:
        result = dict(trial.last_result or {})
        result.setdefault("config", trial.config)
        self.writer.put(summary_row(self.ctx, result, trial_id=trial.trial_id, error=error))


def run_status(result: dict[str, Any], error: bool) -> str:
    """completed (all epochs), stopped (early, by the scheduler) or error."""
    if error:
        return "error"
    epoch, epochs = result.get("epoch"), result.get("epochs")
    return "completed" if epoch is not None and epochs is not None and epoch >= epochs else "stopped"


def summary_row(ctx: RowContext, result: dict[str, Any], *, trial_id: str, error: bool) -> dict[str, Any]:
    kind = "final" if ctx.phase == "final" else "trial"
    return make_row(ctx, result, row_kind=kind, status=run_status(result, error), trial_id=trial_id)


def rows_from_trial_log(ctx: RowContext, trial_id: str, results: Iterable[dict[str, Any]], *, error: bool,
                        finished: bool) -> list[dict[str, Any]]:
    """Every row a trial should have, rebuilt from Tune's per-trial result log (for reconciliation)."""
    rows, last = [], None
    for result in results:
        if "epoch" in result:
            rows.append(make_row(ctx, result, row_kind="report", status="running", trial_id=trial_id))
            last = result
    if finished and last is not None:
        rows.append(summary_row(ctx, last, trial_id=trial_id, error=error))
    return rows


# ---- reading ------------------------------------------------------------------------------------
def stored_row_ids(storage: Storage, sweep: str) -> set[str]:
    root = storage.path("results", f"sweep={sweep}")
    files = storage.list_files(root, ".parquet")
    if not files:
        return set()
    ids = pads.dataset(files, filesystem=storage.fs, format="parquet", schema=FILE_SCHEMA).to_table(columns=["row_id"])
    return set(ids.column("row_id").to_pylist())


def read_results(storage: str | Storage, sweep: str | None = None, *, dedup: bool = True) -> pa.Table:
    """Every stored row (of one sweep, or all), with the documented SCHEMA, one row per row_id."""
    storage = storage if isinstance(storage, Storage) else Storage.of(storage)
    base = results_root(storage) + (f"/sweep={sweep}" if sweep else "")
    files = storage.list_files(base, ".parquet")
    if not files:
        return SCHEMA.empty_table()
    part = pads.partitioning(PARTITION_SCHEMA, flavor="hive")
    dataset = pads.dataset(files, filesystem=storage.fs, format="parquet", schema=SCHEMA, partitioning=part,
                           partition_base_dir=results_root(storage))
    table = dataset.to_table().select(list(COLUMNS))
    if not dedup or table.num_rows == 0:
        return table
    table = table.take(pc.sort_indices(table, [("created_at", "ascending"), ("row_id", "ascending")]))
    seen: set[str] = set()
    keep = [not (rid in seen or seen.add(rid)) for rid in table.column("row_id").to_pylist()]
    return table.filter(pa.array(keep, pa.bool_()))


def duckdb_connect(storage: str | Storage, sweep: str | None = None, con: Any = None) -> Any:
    """A DuckDB connection with a view `results` over the Parquet files (deduplicated on row_id).

    Local storage is read by DuckDB directly (hive partitions with explicit VARCHAR types); other
    storages go through pyarrow (DuckDB scans the Arrow table).
    """
    import duckdb

    storage = storage if isinstance(storage, Storage) else Storage.of(storage)
    con = con or duckdb.connect()
    if storage.local:
        base = results_root(storage) + (f"/sweep={sweep}" if sweep else "")
        if not storage.list_files(base, ".parquet"):
            con.register("results_raw", read_results(storage, sweep, dedup=False))
            source = "results_raw"
        else:
            glob = f"{results_root(storage)}/{f'sweep={sweep}' if sweep else 'sweep=*'}/task=*/*.parquet"
            source = (f"read_parquet('{glob}', hive_partitioning=true, "
                      "hive_types={'sweep': 'VARCHAR', 'task': 'VARCHAR'}, union_by_name=true)")
    else:
        con.register("results_raw", read_results(storage, sweep, dedup=False))
        source = "results_raw"
    cols = ", ".join(f'"{c}"' for c in COLUMNS)
    con.execute(f"CREATE OR REPLACE VIEW results AS SELECT {cols} FROM {source} "
                "QUALIFY row_number() OVER (PARTITION BY row_id ORDER BY created_at) = 1")
    return con
