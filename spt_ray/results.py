"""Sweep results as Parquet: one fixed, typed schema; few files; streamed while Tune runs.

Layout and commits: spt_ray/result_files.py (a manifest names the sweep's files; readers never see a
half state). Every column of `SCHEMA` is its own typed column (no dict serialised as a string: every
searched parameter, metric, timing and package version).

Writing. Rows come from a Tune Callback running on Tune's event loop, which only builds a dict and puts
it on a queue; a background thread batches them, rows of every task together, and commits one file per
flush. When a task's phase ends the driver asks for its rows to be compacted into one file
(`ResultsWriter.compact`), so a sweep ends with about one file per task and phase.

No duplicates. Every row has a deterministic `row_id` (sweep, phase, run, row kind, epoch). The writer
knows the ids stored for the sweep and skips rows it has written before, so re-running the
reconciliation or resuming a sweep adds only what is missing. One exception: a run's summary that is
not an error supersedes its stored error summary (a trial that errored, then completed on `--resume`),
in the same commit that removes the old row. So the stored rows are unique and queries scan them
plainly; `read_results` still applies the same rule (`result_files.dedup`) as a safety net. Sweeps in
the older hive layout (`task=<task>/` folders, possibly duplicated) are read de-duplicated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
from ray.tune import Callback

from .result_files import ResultFiles, legacy_files, local_files, read_legacy, read_sweep_files, sweep_names
from .result_files import dedup as _dedup
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

    def for_phase(self, phase: str | None) -> "RowContext":
        """The context of a trial of `phase` (one experiment runs both phases; the trial's config says which)."""
        return self if phase in (None, self.phase) else replace(self, phase=phase)


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
    """Batches rows of every task on a background thread into one Parquet file per flush; skips row ids
    already stored; compacts a task's phase on request. Every change of the files happens on that thread
    (`ResultFiles`), in queue order.

    One writer per (storage, sweep) and process (`ResultsWriter.shared`): the Tune callback Tune
    unpickles on `Tuner.restore` and the driver reach the same writer.
    """

    _shared: dict[tuple[str, str], "ResultsWriter"] = {}
    _shared_lock = threading.Lock()

    def __init__(self, storage: Storage, sweep: str, *, flush_s: float = 2.0, max_rows: int = 512):
        self.storage, self.sweep = storage, sweep
        self.flush_s, self.max_rows = flush_s, max_rows
        self.queue: queue.Queue = queue.Queue()
        self.files: ResultFiles | None = None
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
            if self.files is None:
                self.files = ResultFiles(self.storage, self.sweep, SCHEMA, _read_legacy)
            self._thread = threading.Thread(target=self._run, name=f"spt-results-{self.sweep}", daemon=True)
            self._thread.start()

    def put(self, row: dict[str, Any]) -> None:
        self.queue.put(row)

    def call(self, fn: Any, timeout: float = 120.0) -> Any:
        """Run `fn(files)` on the writer thread after every row queued so far is written; its result."""
        box: dict[str, Any] = {}
        self.queue.put((fn, box))
        self.flush(timeout)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def compact(self, task: str, phase: str) -> None:
        """Ask for the task's rows of `phase` in one file (its phase ended); done in queue order, later."""
        self.queue.put((lambda files: files.compact(task, phase), {}))

    def remove_rows(self, phase: str, mask_of: Any) -> set[str]:
        """Remove the stored rows of `phase` that `mask_of(table)` marks; their ids may be written again."""
        return self.call(lambda files: files.remove(phase, mask_of))

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
            due = stop or isinstance(item, (threading.Event, tuple)) or len(pending) >= self.max_rows \
                or time.monotonic() - last >= self.flush_s
            if due:
                if pending:
                    self._write(pending)
                    pending = []
                last = time.monotonic()
            if isinstance(item, tuple):  # an operation on the files (compaction, removal)
                self._operate(*item)
            if isinstance(item, threading.Event):
                item.set()
            if stop:
                self._operate(lambda files: files.delete_dropped(), {})
                return

    def _write(self, rows: list[dict[str, Any]]) -> None:
        try:  # one file for the batch, every task's rows together
            written, skipped = self.files.append(rows)
        except Exception as err:  # keep the thread alive; flush() reports it (nothing half-written is listed)
            logger.error("writing %d result rows of sweep %s failed: %s", len(rows), self.sweep, err)
            self.errors.append(f"{type(err).__name__}: {err}")
            return
        self.files_written += bool(written)
        self.rows_written += written
        self.rows_skipped += skipped

    def _operate(self, fn: Any, box: dict[str, Any]) -> None:
        try:
            box["value"] = fn(self.files)
        except Exception as err:
            logger.error("results of sweep %s: %s failed: %s", self.sweep, getattr(fn, "__name__", "operation"), err)
            box["error"] = err


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
            self.writer.put(make_row(self.ctx.for_phase(trial.config.get("phase")), result, row_kind="report",
                                     status="running", trial_id=trial.trial_id))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._summary(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._summary(trial, error=True)

    def _summary(self, trial: Any, error: bool) -> None:
        result = dict(trial.last_result or {})
        result.setdefault("config", trial.config)
        self.writer.put(summary_row(self.ctx.for_phase(trial.config.get("phase")), result, trial_id=trial.trial_id,
                                    error=error))


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
def _read_legacy(storage: Storage, sweep: str) -> pa.Table:
    return read_legacy(storage, sweep, SCHEMA, FILE_SCHEMA, PARTITION_SCHEMA)


def read_results(storage: str | Storage, sweep: str | None = None, *, dedup: bool = True) -> pa.Table:
    """Every stored row (of one sweep, or all), with the documented SCHEMA, one row per row_id.

    `dedup=False` returns the stored rows as they are: the same rows, since the writer stores each
    row id once; only sweeps in the older hive layout (or written by two drivers at once) differ.
    """
    storage = storage if isinstance(storage, Storage) else Storage.of(storage)
    tables = []
    for name in sweep_names(storage, sweep):
        table = read_sweep_files(storage, name, SCHEMA)
        tables.append(table if table is not None else _read_legacy(storage, name))
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    return _dedup(table) if dedup else table


def duckdb_connect(storage: str | Storage, sweep: str | None = None, con: Any = None) -> Any:
    """A DuckDB connection with a view `results` over the sweep's Parquet files: a plain scan (rows are
    unique when written); sweeps in the older hive layout are de-duplicated in the view.

    Local storage is read by DuckDB directly (the files the manifest names when the view is made: a
    connection is a snapshot of a running sweep; connect again for newer rows); other storages go
    through pyarrow (DuckDB scans the Arrow table).
    """
    import duckdb

    storage = storage if isinstance(storage, Storage) else Storage.of(storage)
    con = con or duckdb.connect()
    cols = ", ".join(f'"{c}"' for c in COLUMNS)
    sources: list[str] = []
    if storage.local:
        files: list[str] = []
        for name in sweep_names(storage, sweep):
            listed = local_files(storage, name)
            if listed is not None:
                files += listed
            elif legacy_files(storage, name):
                glob = f"{results_root(storage)}/sweep={name}/task=*/*.parquet"
                sources.append(f"SELECT {cols} FROM read_parquet('{glob}', hive_partitioning=true, "
                               "hive_types={'sweep': 'VARCHAR', 'task': 'VARCHAR'}, union_by_name=true) "
                               "QUALIFY row_number() OVER (PARTITION BY row_id ORDER BY created_at) = 1")
        if files:
            listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            sources.insert(0, f"SELECT {cols} FROM read_parquet([{listing}], hive_partitioning=false)")
    if not sources:
        con.register("results_rows", read_results(storage, sweep))
        sources = [f"SELECT {cols} FROM results_rows"]
    con.execute("CREATE OR REPLACE VIEW results AS " + " UNION ALL ".join(sources))
    return con
