"""Lean results: one file per flush across tasks, compaction per task and phase that readers never see half
done, rows unique when written (so the DuckDB view scans plainly), a completed summary superseding an earlier
error summary of the same run, and failed writes that leave nothing behind. Real Parquet and DuckDB."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pyarrow.parquet as pq
import pytest

from spt_ray.result_files import MANIFEST, dedup
from spt_ray.results import SCHEMA, ResultsWriter, RowContext, duckdb_connect, make_row, read_results, summary_row
from spt_ray.storage import Storage

CTX = RowContext("sw", "search", "mini", "b", "h")
TASKS = ("shapes", "count", "orient")


def _result(task: str, trial: str, epoch: int, epochs: int = 2) -> dict:
    return {"trial_id": trial, "training_iteration": epoch, "epoch": epoch, "epochs": epochs, "val_acc": 0.5,
            "config": {"task": task, "method": "spt-lora", "searched": True}}


def _report(task: str, trial: str, epoch: int) -> dict:
    return make_row(CTX, _result(task, trial, epoch), row_kind="report", status="running", trial_id=trial)


def _writer(root, flush_s: float = 30.0) -> ResultsWriter:
    w = ResultsWriter(Storage.of(root), "sw", flush_s=flush_s)
    w.start()
    return w


def _files(root) -> list:
    return sorted(p for p in (root / "results" / "sweep=sw").rglob("*") if p.is_file())


def _manifest(root) -> list[str]:
    return json.loads((root / "results" / "sweep=sw" / MANIFEST).read_text())["files"]


def test_one_file_per_flush_holds_every_tasks_rows(tmp_path):
    writer = _writer(tmp_path)
    try:
        for task in TASKS:
            for epoch in (1, 2):
                writer.put(_report(task, f"{task}-t", epoch))
        writer.flush()
    finally:
        writer.close()
    parquet = [p for p in _files(tmp_path) if p.suffix == ".parquet"]
    assert len(parquet) == 1 and parquet[0].parent.name == "sweep=sw"  # not one file per task
    assert _manifest(tmp_path) == [parquet[0].name]
    assert Counter(pq.read_table(parquet[0]).column("task").to_pylist()) == {t: 2 for t in TASKS}
    assert not [p for p in _files(tmp_path) if p.name.startswith(".")]
    assert read_results(tmp_path, "sw").num_rows == 6


def test_compaction_gives_one_file_per_task_and_phase_and_readers_never_see_half(tmp_path):
    writer = _writer(tmp_path)
    expected = 0
    try:
        for epoch in (1, 2, 3):  # three flushes, each with rows of every task
            for task in TASKS:
                writer.put(_report(task, f"{task}-t", epoch))
                expected += 1
            writer.flush()
        assert len(_manifest(tmp_path)) == 3
        seen: list[tuple[int, int]] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def read_all() -> None:
            try:
                read_until(stop)
            except BaseException as err:  # noqa: BLE001 - reported by the test
                errors.append(err)

        def read_until(stop: threading.Event) -> None:
            while not stop.is_set():
                ids = read_results(tmp_path, "sw", dedup=False).column("row_id").to_pylist()
                seen.append((len(ids), len(set(ids))))
                con = duckdb_connect(tmp_path, "sw")
                seen.append(con.execute("SELECT count(*), count(DISTINCT row_id) FROM results").fetchone())

        reader = threading.Thread(target=read_all)
        reader.start()
        for task in TASKS:
            writer.compact(task, "search")
            writer.flush()
        stop.set()
        reader.join()
    finally:
        writer.close()
    assert not errors and seen and set(seen) == {(expected, expected)}  # every read: all rows, each once
    names = _manifest(tmp_path)
    assert len(names) == 3 and all(n.startswith("search-") for n in names)
    assert sorted(p.name for p in _files(tmp_path) if p.suffix == ".parquet") == sorted(names)  # parts deleted
    for name in names:
        tasks = set(pq.read_table(tmp_path / "results" / "sweep=sw" / name).column("task").to_pylist())
        assert len(tasks) == 1 and name.startswith(f"search-{tasks.pop()}-")


def test_a_completed_summary_supersedes_the_error_summary_of_the_same_run(tmp_path):
    """A trial errored, then completed on --resume: the summary row says completed (the first-written error
    row used to win), in the writer, after compaction, in read_results and in the DuckDB view."""
    errored = summary_row(CTX, _result("shapes", "t1", 1), trial_id="t1", error=True)
    completed = summary_row(CTX, _result("shapes", "t1", 2), trial_id="t1", error=False)
    assert errored["row_id"] == completed["row_id"] and errored["status"] == "error"

    def statuses() -> list[tuple]:
        raw = read_results(tmp_path, "sw", dedup=False)
        view = duckdb_connect(tmp_path, "sw").execute("SELECT status, epoch FROM results WHERE row_kind = 'trial'")
        return [(r["status"], r["epoch"]) for r in raw.to_pylist() if r["row_kind"] == "trial"] + view.fetchall()

    writer = _writer(tmp_path)
    try:
        writer.put(_report("count", "t2", 1))
        writer.put(errored)
        writer.flush()
        writer.put(errored)  # the reconciliation sees the error again: still one row
        writer.flush()
        assert statuses() == [("error", 1)] * 2
    finally:
        writer.close()
    resumed = _writer(tmp_path)  # a new driver (--resume): its writer knows the stored rows
    try:
        resumed.put(completed)
        resumed.put(errored)  # an error after a completed summary never replaces it
        resumed.flush()
        assert statuses() == [("completed", 2)] * 2
        resumed.compact("shapes", "search")
        resumed.flush()
        assert statuses() == [("completed", 2)] * 2
    finally:
        resumed.close()
    assert read_results(tmp_path, "sw").num_rows == 2


def test_dedup_prefers_a_non_error_row_then_the_first_written():
    import pyarrow as pa
    from datetime import datetime, timezone

    def row(rid: str, status: str, second: int) -> dict:
        return {"row_id": rid, "status": status, "created_at": datetime(2026, 1, 1, 0, 0, second, tzinfo=timezone.utc)}

    rows = [row("a", "error", 1), row("a", "completed", 2), row("a", "stopped", 3), row("b", "running", 5),
            row("b", "running", 4), row("c", "error", 1)]
    out = dedup(pa.Table.from_pylist(rows, schema=SCHEMA)).to_pylist()
    assert sorted((r["row_id"], r["status"], r["created_at"].second) for r in out) == [
        ("a", "completed", 2), ("b", "running", 4), ("c", "error", 1)]


def test_a_failed_write_lists_nothing_and_leaves_no_file(tmp_path, monkeypatch):
    writer = _writer(tmp_path)
    try:
        writer.put(_report("shapes", "t1", 1))
        writer.flush()
        before = _files(tmp_path)
        storage = writer.storage

        def full(path: str, data: bytes) -> None:
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(type(storage), "write_bytes", lambda self, path, data: full(path, data))
        writer.put(_report("count", "t2", 1))
        with pytest.raises(RuntimeError, match="No space left"):
            writer.flush()
    finally:
        monkeypatch.undo()
        with pytest.raises(RuntimeError):
            writer.close()
    assert _files(tmp_path) == before and read_results(tmp_path, "sw").num_rows == 1


def test_a_hive_layout_sweep_is_read_and_moved_into_the_manifest_layout(tmp_path):
    import pyarrow as pa

    from spt_ray.results import FILE_SCHEMA

    folder = tmp_path / "results" / "sweep=sw" / "task=shapes"
    folder.mkdir(parents=True)
    rows = [_report("shapes", "t1", e) for e in (1, 2)]
    pq.write_table(pa.Table.from_pylist(rows, schema=FILE_SCHEMA), folder / "part-a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1], schema=FILE_SCHEMA), folder / "part-b.parquet")
    assert read_results(tmp_path, "sw").num_rows == 2
    writer = _writer(tmp_path)
    writer.put(_report("shapes", "t1", 3))
    writer.close()
    assert not folder.exists() or not list(folder.iterdir())
    table = read_results(tmp_path, "sw", dedup=False)
    assert sorted(table.column("epoch").to_pylist()) == [1, 2, 3] and set(table.column("task").to_pylist()) == {"shapes"}
