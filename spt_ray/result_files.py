"""The files of one sweep's results: a manifest names them, commits swap it, compaction keeps them few.

Layout: `<storage>/results/sweep=<name>/part-*.parquet` (one file per writer flush, rows of every task)
and `<phase>-<task>-*.parquet` (one per task and phase once that phase has ended: the compacted rows),
listed by `_manifest.json` next to them. Every file holds every column of `SCHEMA` (sweep and task too).

Why a manifest: compaction turns several files into others, and superseding a row (a run that errored
and then completed on `--resume`) rewrites the file that held it. Readers must never see a half state
(both the old and new files: duplicates; neither: missing rows), and a directory listing cannot switch
several files at once. So readers read exactly the files the manifest names, and a commit (1) writes its
new files, each complete before visible, (2) replaces the manifest whole (one atomic write), (3) deletes
the files it dropped once they have been unlisted for a grace period (and when the writer closes). A
reader that read the manifest before a commit and still finds a file gone reads the manifest again. Files the manifest does not name (a driver killed between (1) and (2)) are never
read; the next writer of the sweep deletes them (one writer per sweep: its Tune experiment's driver).

One row per `row_id` at write time, so queries scan plainly (no de-duplicating window): the writer skips
a row whose id is stored, except that a summary that is not an error supersedes a stored error summary
of the same run (`supersedes`); `dedup` applies the same rule to a table (compaction, and readers as a
safety net). Sweeps written before the manifest existed (files under `task=<task>/`, hive layout) are
read as they are and moved into this layout by the first writer of the sweep.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .storage import Storage

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
INDEX_COLUMNS = ["row_id", "status", "task", "phase"]


def sweep_dir(storage: Storage, sweep: str) -> str:
    return storage.path("results", f"sweep={sweep}")


def sweep_names(storage: Storage, sweep: str | None = None) -> list[str]:
    """[sweep], or the names of every sweep with results under the storage."""
    if sweep is not None:
        return [sweep]
    infos = storage.fs.get_file_info(pafs.FileSelector(storage.path("results"), allow_not_found=True))
    return sorted(i.base_name.removeprefix("sweep=") for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("sweep="))


def supersedes(new_status: str | None, old_status: str | None) -> bool:
    """A run's summary that is not an error replaces its earlier error summary (the run completed or was
    stopped after `--resume` reran it); every other repeat of a row id is the row already stored."""
    return old_status == "error" and new_status not in (None, "error")


def dedup(table: pa.Table) -> pa.Table:
    """One row per row_id: a non-error row before an error row, then the first written (`supersedes`)."""
    if table.num_rows < 2:
        return table
    is_error = pc.fill_null(pc.equal(table.column("status"), "error"), False)
    keyed = table.append_column("__err", is_error)
    keyed = keyed.take(pc.sort_indices(keyed, [("row_id", "ascending"), ("__err", "ascending"),
                                               ("created_at", "ascending")]))
    ids = keyed.column("row_id").combine_chunks()
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    keep = pa.concat_arrays([pa.array([True]), pc.fill_null(first, True)])
    return keyed.filter(keep).drop_columns(["__err"])


def read_manifest(storage: Storage, sweep: str) -> list[str] | None:
    """File names (relative to the sweep's folder) the sweep's results consist of; None: no manifest."""
    path = f"{sweep_dir(storage, sweep)}/{MANIFEST}"
    if not storage.exists(path):
        return None
    return list(json.loads(storage.read_bytes(path))["files"])


def read_sweep_files(storage: Storage, sweep: str, schema: pa.Schema, attempts: int = 5) -> pa.Table | None:
    """Every row of the files the manifest names (None without a manifest); retried when a commit deleted a
    file between reading the manifest and opening it."""
    for attempt in range(attempts):
        names = read_manifest(storage, sweep)
        if names is None:
            return None
        try:
            tables = [pq.read_table(f"{sweep_dir(storage, sweep)}/{n}", filesystem=storage.fs, schema=schema)
                      for n in names]
        except (FileNotFoundError, OSError) as err:
            if attempt == attempts - 1:
                raise
            logger.debug("results of %s changed while reading (%s); reading again", sweep, err)
            continue
        return pa.concat_tables(tables) if tables else schema.empty_table()
    return None


def local_files(storage: Storage, sweep: str) -> list[str] | None:
    """Paths of the manifest's files (for DuckDB's own reader); None without a manifest."""
    names = read_manifest(storage, sweep)
    return None if names is None else [f"{sweep_dir(storage, sweep)}/{n}" for n in names]


def _stamp() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class ResultFiles:
    """The writer thread's view of one sweep's files: which row ids each holds, and commits that change
    them (append a batch, compact a task's phase, remove rows). Not thread-safe: one thread uses it."""

    def __init__(self, storage: Storage, sweep: str, schema: pa.Schema,
                 read_legacy: Callable[[Storage, str], pa.Table], grace_s: float = 30.0):
        self.storage, self.sweep, self.schema = storage, sweep, schema
        self.dir = sweep_dir(storage, sweep)
        self.grace_s = grace_s
        self.dropped: list[tuple[str, float]] = []  # (file, when a commit dropped it): deleted after grace_s
        self.rows: dict[str, tuple[str, str | None]] = {}  # row_id -> (file, status)
        self.groups: dict[str, set[tuple[str, str]]] = {}  # file -> its (task, phase) pairs
        names = read_manifest(storage, sweep)
        if names is None:
            self.files: list[str] = []
            legacy = legacy_files(storage, sweep)
            if legacy:  # a sweep from before the manifest: one file in this layout, then the old files go
                self.commit({f"part-{_stamp()}.parquet": dedup(read_legacy(storage, sweep))}, ())
                for path in legacy:
                    storage.fs.delete_file(path)
            return
        self.files = names
        for name in names:
            self._index(name, pq.read_table(f"{self.dir}/{name}", filesystem=storage.fs, columns=INDEX_COLUMNS))
        self._sweep_orphans()

    def _index(self, name: str, table: pa.Table) -> None:
        cols = table.select(INDEX_COLUMNS).to_pydict()
        for rid, status in zip(cols["row_id"], cols["status"]):
            self.rows[rid] = (name, status)
        self.groups[name] = set(zip(cols["task"], cols["phase"]))

    def _sweep_orphans(self) -> None:
        """Delete files a killed writer wrote but never committed (no reader ever sees them)."""
        listed = set(self.files)
        for path in self.storage.list_files(self.dir, ".parquet"):
            if path.rsplit("/", 1)[1] not in listed and "/" not in path[len(self.dir) + 1:]:
                logger.info("removing %s: written by a writer that stopped before committing it", path)
                self.storage.fs.delete_file(path)

    # ---- commits ----------------------------------------------------------------------------------
    def commit(self, add: dict[str, pa.Table], drop: Iterable[str]) -> None:
        """Write `add`, then switch the manifest to (files - drop + add), then delete `drop`; a failure
        before the switch deletes what it wrote and changes nothing (readers never saw those files)."""
        drop = list(drop)
        written: list[str] = []
        try:
            for name, table in add.items():
                buf = io.BytesIO()
                pq.write_table(table.cast(self.schema), buf, compression="zstd")
                self.storage.write_bytes(f"{self.dir}/{name}", buf.getvalue())
                written.append(name)
            files = [f for f in self.files if f not in drop] + list(add)
            self.storage.write_bytes(f"{self.dir}/{MANIFEST}", json.dumps({"files": files}).encode())
        except BaseException:
            for name in written:
                try:
                    self.storage.fs.delete_file(f"{self.dir}/{name}")
                except OSError:
                    pass
            raise
        self.files = files
        now = time.monotonic()
        for name in drop:
            self.groups.pop(name, None)
            self.dropped.append((name, now))
        for name, table in add.items():
            self._index(name, table)
        self.delete_dropped(self.grace_s)

    def delete_dropped(self, older_than_s: float = 0.0) -> None:
        """Delete files commits dropped at least `older_than_s` ago. The grace lets a reader that read the
        manifest before the commit (a DuckDB view made a moment ago) still open them."""
        now, kept = time.monotonic(), []
        for name, when in self.dropped:
            if now - when < older_than_s:
                kept.append((name, when))
                continue
            try:
                self.storage.fs.delete_file(f"{self.dir}/{name}")
            except OSError as err:  # not listed any more: never read; removed by the next writer
                logger.warning("could not delete %s/%s: %s", self.dir, name, err)
        self.dropped = kept

    def _read(self, name: str) -> pa.Table:
        return pq.read_table(f"{self.dir}/{name}", filesystem=self.storage.fs, schema=self.schema)

    def _rewrite_without(self, files: Iterable[str], mask_of: Callable[[pa.Table], pa.Array]) -> dict[str, Any]:
        """New tables for `files` without the rows `mask_of` marks (merged into one file), and those rows."""
        tables = [self._read(f) for f in files]
        if not tables:
            return {"rest": None, "removed": self.schema.empty_table()}
        table = pa.concat_tables(tables)
        mask = mask_of(table)
        rest = table.filter(pc.invert(mask))
        return {"rest": rest if rest.num_rows else None, "removed": table.filter(mask)}

    # ---- operations -------------------------------------------------------------------------------
    def append(self, rows: list[dict[str, Any]]) -> tuple[int, int]:
        """Commit the rows not stored yet (and those superseding a stored error summary) as one file;
        returns (written, skipped)."""
        fresh: dict[str, dict[str, Any]] = {}
        for r in rows:
            rid, status = r["row_id"], r.get("status")
            old = fresh[rid]["status"] if rid in fresh else self.rows.get(rid, (None, None))[1]
            if (rid in fresh or rid in self.rows) and not supersedes(status, old):
                continue
            fresh[rid] = r
        replaced = {rid for rid in fresh if rid in self.rows}
        if not fresh:
            return 0, len(rows)
        holders = sorted({self.rows[rid][0] for rid in replaced})
        add = {f"part-{_stamp()}.parquet": pa.Table.from_pylist(list(fresh.values()), schema=self.schema)}
        if holders:
            ids = pa.array(sorted(replaced), pa.string())
            out = self._rewrite_without(holders, lambda t: pc.is_in(t.column("row_id"), ids))
            if out["rest"] is not None:
                add[f"part-{_stamp()}.parquet"] = out["rest"]
        self.commit(add, holders)
        return len(fresh), len(rows) - len(fresh)

    def compact(self, task: str, phase: str) -> str | None:
        """One de-duplicated file for the rows of `task` in `phase` (its phase ended); the other rows of the
        files it came from go into one file. Returns the compacted file's name (None: nothing to do)."""
        holders = sorted(f for f in self.files if (task, phase) in self.groups.get(f, ()))
        if not holders or (len(holders) == 1 and self.groups[holders[0]] == {(task, phase)}
                           and holders[0].startswith(f"{_safe(phase)}-{_safe(task)}-")):
            return None  # compacted already
        out = self._rewrite_without(holders, lambda t: pc.fill_null(pc.and_(
            pc.equal(t.column("task"), task), pc.equal(t.column("phase"), phase)), False))
        mine = dedup(out["removed"])
        mine = mine.take(pc.sort_indices(mine, [("row_kind", "ascending"), ("trial_id", "ascending"),
                                                ("epoch", "ascending")]))
        name = f"{_safe(phase)}-{_safe(task)}-{_stamp()}.parquet"
        add = {name: mine}
        if out["rest"] is not None:
            add[f"part-{_stamp()}.parquet"] = out["rest"]
        self.commit(add, holders)
        return name

    def remove(self, phase: str, mask_of: Callable[[pa.Table], pa.Array]) -> set[str]:
        """Remove the rows of `phase` that `mask_of` marks, in one commit; returns their row ids."""
        holders = [f for f in self.files if any(p == phase for _, p in self.groups.get(f, ()))]
        out = self._rewrite_without(holders, mask_of)
        removed = set(out["removed"].column("row_id").to_pylist())
        if not removed:
            return removed
        self.commit({f"part-{_stamp()}.parquet": out["rest"]} if out["rest"] is not None else {}, holders)
        for rid in removed:
            self.rows.pop(rid, None)
        return removed


def legacy_files(storage: Storage, sweep: str) -> list[str]:
    """Hive-layout files of a sweep without a manifest (written before it existed)."""
    return storage.list_files(sweep_dir(storage, sweep), ".parquet")


def read_legacy(storage: Storage, sweep: str, schema: pa.Schema, file_schema: pa.Schema,
                partition_schema: pa.Schema) -> pa.Table:
    """Rows of a hive-layout sweep (task from the folder name)."""
    files = legacy_files(storage, sweep)
    if not files:
        return schema.empty_table()
    part = pads.partitioning(partition_schema, flavor="hive")
    dataset = pads.dataset(files, filesystem=storage.fs, format="parquet", schema=schema, partitioning=part,
                           partition_base_dir=storage.path("results"))
    return dataset.to_table().select(schema.names)
