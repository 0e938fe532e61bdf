"""Faults of a sweep, end to end: Ctrl-C (SIGINT) in the sensitivity pass, the search and the final phase,
SIGKILL in the search, each followed by `--resume` and compared row by row with one uninterrupted run;
errors from inside Ray reaching the user as the project's own line; checks that run before a sweep
writes anything.

Every sweep is `spt-ray tune` in a subprocess (its own session, so a signal to its process group is what
Ctrl-C in a terminal sends) attached to the test session's Ray cluster, with the smallest settings that
still run every phase (tests/tiny_tune.py); the uninterrupted run is the session's `tiny_tune`. Interrupts
are triggered by what appears (a store computing, a checkpoint on disk), never by sleeps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from spt_ray.driver import measure_overhead
from spt_ray.results import ResultsWriter, RowContext, make_row, read_results
from spt_ray.resume import FINAL_RECORD, align_final, read_final_record
from spt_ray.storage import Storage
from tests.tiny_tune import finish, start_tune

CONFIG_COLUMNS = ("task", "label", "seed", "method", "budget", "alpha", "rank", "lr", "weight_decay", "bits")
RESUME_LINE = "rerun the same command with --resume"


# ---- helpers ----------------------------------------------------------------------------------------
def _log(tmp: Path, tag: str) -> str:
    return (tmp / f"{tag}.log").read_text()


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """`spt-ray` in this process: exit code and stderr."""
    from spt_ray.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _wait(proc: subprocess.Popen, predicate, what: str, tmp: Path, tag: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"sweep ended before {what}:\n{_log(tmp, tag)[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _interrupt(proc: subprocess.Popen, tmp: Path, tag: str, stage: str) -> None:
    """Ctrl-C: SIGINT to the process group; exit 130 and exactly one line naming --resume and the stage."""
    os.killpg(proc.pid, signal.SIGINT)
    code = finish(proc)
    out = _log(tmp, tag)
    assert code == 130, out[-3000:]
    resume_lines = [line for line in out.splitlines() if "--resume" in line]
    assert len(resume_lines) == 1 and RESUME_LINE in resume_lines[0] and stage in resume_lines[0], resume_lines
    assert resume_lines[0].startswith("spt-ray tune: interrupted")
    assert "Tuner.restore" not in out and "Traceback" not in out


def _checkpoint(storage: Path, name: str, phase: str):
    return lambda: any((storage / "tune" / f"{name}-sweep").glob(f"{phase}-*/checkpoint_000000"))


def _rows(storage: Path, name: str) -> list[dict]:
    raw, table = read_results(storage, name, dedup=False), read_results(storage, name)
    assert raw.num_rows == table.num_rows == len(set(table.column("row_id").to_pylist())), "duplicate rows"
    return table.to_pylist()


def _configs(rows: list[dict], kind: str) -> list[tuple]:
    return sorted(tuple(r[c] for c in CONFIG_COLUMNS) for r in rows if r["row_kind"] == kind)


def _check_complete(storage: Path, name: str) -> list[dict]:
    """Every row once: each search trial's epochs 1..n, one final row per (task, label, seed) with a test score."""
    rows = _rows(storage, name)
    for t in (r for r in rows if r["row_kind"] == "trial"):
        epochs = sorted(r["epoch"] for r in rows if r["row_kind"] == "report" and r["trial_id"] == t["trial_id"])
        assert epochs == list(range(1, t["epoch"] + 1)) and t["status"] == "completed"
    finals = [r for r in rows if r["row_kind"] == "final"]
    assert Counter(r["run_id"] for r in finals) == {"shapes/best/seed42": 1, "shapes/linear/seed42": 1}
    assert all(r["status"] == "completed" and r["test_acc"] is not None for r in finals)
    reports = {r["trial_id"] for r in rows if r["row_kind"] == "report"}
    assert reports == {r["trial_id"] for r in rows if r["row_kind"] in ("trial", "final")}, "orphan rows"
    summary = json.loads((storage / "sweeps" / name / "result.json").read_text())
    share = summary["overhead"]["share"]
    assert share is None or math.isnan(share) or 0.0 <= share <= 1.0, summary["overhead"]
    return rows


def _store_computing(storage: Path):
    """True while the sensitivity store of `storage` computes a map (the driver waits in the pass)."""
    import ray

    from spt_ray.store import NAMESPACE, STORE_NAME

    name = f"{STORE_NAME}-{hashlib.sha256(Storage.of(storage).root.encode()).hexdigest()[:10]}"

    def check() -> bool:
        try:
            store = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return False
        return bool(ray.get(store.stats.remote())["inflight"])

    return check


# ---- the sweeps -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_tune):
    """One uninterrupted sweep: the rows every interrupted-and-resumed sweep must reproduce."""
    assert tiny_tune.returncode == 0, tiny_tune.stderr[-3000:]
    rows = _check_complete(tiny_tune.storage, tiny_tune.name)
    return {"storage": tiny_tune.storage, "search": _configs(rows, "trial"), "final": _configs(rows, "final")}


@pytest.mark.slow
def test_ctrl_c_in_every_phase_then_resume_gives_the_uninterrupted_rows(reference, ray_cluster, ray_mini_root,
                                                                         ray_backbone, tmp_path):
    storage, name, address = tmp_path / "storage", "cc", ray_cluster.address

    def run(tag: str, *extra: str) -> subprocess.Popen:
        return start_tune(tmp_path, storage, name, ray_mini_root, ray_backbone, address, tag, *extra)

    proc = run("sensitivity")  # (a) while the store computes the map (a fresh storage: nothing cached)
    _wait(proc, _store_computing(storage), "the sensitivity computation", tmp_path, "sensitivity")
    _interrupt(proc, tmp_path, "sensitivity", "the sensitivity pass")
    assert not (storage / "sweeps" / name / "spec.json").exists()  # no sweep yet: the same command reruns

    proc = run("search", "--resume")  # (b) after the first search checkpoint, one epoch of two done
    _wait(proc, _checkpoint(storage, name, "search"), "a search checkpoint", tmp_path, "search")
    _interrupt(proc, tmp_path, "search", "the search phase")
    assert not (storage / "sweeps" / name / FINAL_RECORD).exists()  # nothing selected from a partial search
    assert not any(r["phase"] == "final" for r in _rows(storage, name))

    proc = run("final", "--resume")  # (c) after the first final checkpoint
    _wait(proc, _checkpoint(storage, name, "final"), "a final checkpoint", tmp_path, "final")
    _interrupt(proc, tmp_path, "final", "the final phase")

    proc = run("done", "--resume")
    assert finish(proc) == 0, _log(tmp_path, "done")[-3000:]
    rows = _check_complete(storage, name)
    assert _configs(rows, "trial") == reference["search"]
    assert _configs(rows, "final") == reference["final"]
    assert any(r["restarts"] for r in rows if r["row_kind"] == "trial")  # the search did resume from checkpoints


@pytest.mark.slow
def test_sigkill_in_the_search_then_resume_gives_the_uninterrupted_rows(reference, ray_cluster, ray_mini_root,
                                                                        ray_backbone, tmp_path):
    storage, name = reference["storage"], "killed"  # the reference's storage: its map is reused

    def run(tag: str, *extra: str) -> subprocess.Popen:
        return start_tune(tmp_path, storage, name, ray_mini_root, ray_backbone, ray_cluster.address, tag, *extra)

    proc = run("first")
    _wait(proc, _checkpoint(storage, name, "search"), "a search checkpoint", tmp_path, "first")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc = run("second", "--resume")
    assert finish(proc) == 0, _log(tmp_path, "second")[-3000:]
    rows = _check_complete(storage, name)
    assert _configs(rows, "trial") == reference["search"]
    assert _configs(rows, "final") == reference["final"]


@pytest.mark.slow
def test_error_inside_ray_reaches_the_user_as_the_projects_line(ray_cluster, ray_mini_root, ray_backbone, tmp_path,
                                                                capsys):
    """A truncated image is found only when the sensitivity task (a Ray task awaited by the store actor)
    decodes it: `spt-ray tune` prints the line `spt-ray sensitivity` (run here, without Ray) prints, and no
    sweep is left behind."""
    data = tmp_path / "data"
    shutil.copytree(Path(ray_mini_root) / "shapes", data / "shapes")
    first = (data / "shapes" / "train800.txt").read_text().split()[0]
    image = data / "shapes" / first
    image.write_bytes(image.read_bytes()[:40])
    storage = tmp_path / "storage"
    proc = start_tune(tmp_path, storage, "bad", str(data), ray_backbone, ray_cluster.address, "tune")
    assert finish(proc) == 2
    tune_lines = _log(tmp_path, "tune").strip().splitlines()
    capsys.readouterr()  # only what the sensitivity command prints counts below
    code, err = _cli(capsys, "sensitivity", "--task", "shapes", "--data-root", data, "--num-batches", "1",
                     "--batch-size", "16", "--out", tmp_path / "maps",
                     *(["--weights", ray_backbone.weights] if ray_backbone.weights else []))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    expected = err.strip().split("spt-ray sensitivity: error: ", 1)[1]
    assert str(image) in expected and tune_lines[-1] == f"spt-ray tune: error: {expected}"
    assert not any("ray::" in line or "Traceback" in line for line in tune_lines)
    assert not (storage / "sweeps" / "bad").exists()  # fixed data reruns with the same command


@pytest.mark.slow
def test_resources_no_node_has_are_refused(ray_cluster, ray_mini_root):
    from spt_ray.preflight import check_resources
    from spt_ray.spec import SweepSpec

    spec = SweepSpec.from_dict({"name": "r", "data_root": ray_mini_root, "storage": "/tmp/unused", "tasks": ["shapes"],
                                "resources": {"cpu": 64}})
    with pytest.raises(ValueError, match=r"a trial asks for CPU=64 .*--cpus-per-trial"):
        check_resources(spec, strict=True)
    check_resources(spec.with_overrides(resources=spec.resources.__class__(cpu=1)), strict=True)


# ---- fast: no Ray ------------------------------------------------------------------------------------
def test_a_recorded_cluster_that_no_longer_answers_is_not_attached_to(tmp_path, monkeypatch):
    """A killed `ray start` leaves its address in Ray's temp dir; ray.init() would retry it for minutes."""
    import socket

    from spt_ray.preflight import dead_recorded_cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert dead_recorded_cluster(str(tmp_path)) is None  # nothing recorded
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        alive = f"127.0.0.1:{listening.getsockname()[1]}"
        (tmp_path / "ray_current_cluster").write_text(alive + "\n")
        assert dead_recorded_cluster(str(tmp_path)) is None
    assert dead_recorded_cluster(str(tmp_path)) == alive  # the same port, closed now
    monkeypatch.setenv("RAY_ADDRESS", alive)  # the user's explicit choice is Ray's to handle
    assert dead_recorded_cluster(str(tmp_path)) is None


def test_storage_that_is_a_file_is_one_line_before_anything_is_written(capsys, tmp_path):
    file = tmp_path / "storage"
    file.write_text("not a folder")
    for storage, needle in ((file, "is a file, not a folder"), (file / "sub", f"is under {file}, which is a file")):
        code, err = _cli(capsys, "tune", "--suite", "mini", "--tasks", "shapes", "--storage", storage)
        assert code == 2 and err.count("\n") == 1 and needle in err and "pass a folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["storage"]


@pytest.mark.parametrize("storage", ["/proc/sys/spt-storage", "/sys/spt-storage"])
def test_readonly_storage_is_one_line(storage, capsys):
    if not Path(storage).parent.is_dir():
        pytest.skip(f"no {Path(storage).parent} here")
    code, err = _cli(capsys, "tune", "--suite", "mini", "--tasks", "shapes", "--storage", storage)
    assert code == 2 and err.count("\n") == 1, err
    assert "is not writable" in err and "pass a folder you can write to" in err and not Path(storage).exists()


def test_failed_checks_leave_no_sweep_and_an_existing_one_names_resume(ray_mini_root, capsys, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(Path(ray_mini_root) / "shapes", data / "shapes")
    (data / "shapes" / "val200.txt").unlink()
    args = ("tune", "--suite", "mini", "--tasks", "shapes", "--data-root", data, "--storage", tmp_path / "st",
            "--name", "s")
    code, err = _cli(capsys, *args)
    assert code == 2 and "val200.txt" in err and err.count("\n") == 1, err
    assert not (tmp_path / "st").exists()
    (tmp_path / "st" / "sweeps" / "s").mkdir(parents=True)
    (tmp_path / "st" / "sweeps" / "s" / "spec.json").write_text("{}")
    code, err = _cli(capsys, *args)
    assert code == 2 and "rerun with --resume" in err and "resume=True" in err, err


def test_nested_ray_errors_unwrap_to_the_projects_line():
    """A DataError raised in a task the store actor awaited arrives as RayTaskError(RayTaskError(DataError))."""
    from ray.exceptions import ActorDiedError, RayTaskError

    from spt_core.data.common import DataError
    from spt_ray.faults import unwrap_ray_error, user_message

    cause = DataError("/d/shapes/images/0.png: cannot decode image; fix: replace the file")
    inner = RayTaskError("_compute_and_rank", "Traceback ...", cause, proctitle="w", pid=1, ip="1.2.3.4")
    outer = RayTaskError("SensitivityStore.get_ranking", "Traceback ...", inner.as_instanceof_cause(),
                         proctitle="w", pid=2, ip="1.2.3.4").as_instanceof_cause()
    assert unwrap_ray_error(outer) is cause and user_message(outer) == str(cause)
    died = user_message(ActorDiedError())
    assert died.startswith("Ray: The actor died unexpectedly") and "--resume" in died and "\n" not in died
    assert user_message(ZeroDivisionError()) is None  # a bug keeps its traceback


def test_ctrl_c_held_through_a_block_arrives_after_it():
    from spt_ray.faults import sigint_held

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # earlier tests (Ray) may have replaced it
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigint_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs here: it must not raise inside the block
                finished = True
        assert finished and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_overhead_counts_only_the_epochs_this_invocation_ran():
    """Two slots for 10 s; a resumed trial reports totals of 100 s of earlier training, which must not count."""
    epochs = [  # trial a: restart 1 (2 epochs here), trial b: fresh (1 epoch); wall_s is cumulative per segment
        {"trial_id": "a", "restarts": 1, "train_s": 3.0, "eval_s": 0.5, "setup_s": 1.0, "wall_s": 4.6,
         "checkpoint_s": 0.1, "train_s_total": 100.0},
        {"trial_id": "a", "restarts": 1, "train_s": 3.0, "eval_s": 0.5, "setup_s": 1.0, "wall_s": 8.2,
         "checkpoint_s": 0.1, "train_s_total": 103.0},
        {"trial_id": "b", "restarts": 0, "train_s": 2.0, "eval_s": 1.0, "setup_s": 0.5, "wall_s": 3.6,
         "checkpoint_s": 0.1},
    ]
    o = measure_overhead(epochs, wall_s=10.0, slots=2, sensitivity_wall_s=0.0)
    assert o["busy_s"] == pytest.approx(10.0) and o["share"] == pytest.approx(1 - 10.0 / 20.0)
    assert o["trial_wall_s"] == pytest.approx(8.2 + 3.6) and o["setup_s"] == pytest.approx(1.5)
    assert o["trial_share"] == pytest.approx(1 - 10.0 / 11.8) and o["runs"] == 2
    assert math.isnan(measure_overhead([], 10.0, 2, 0.0)["share"])


def _final_row(ctx: RowContext, trial_id: str, label: str, budget: int | None) -> dict:
    config = {"task": "shapes", "label": label, "seed": 42, "method": "lora" if label == "lora" else "spt-lora",
              "budget": budget, "run_id": f"shapes/{label}/seed42"}
    return make_row(ctx, {"config": config, "epoch": 2, "epochs": 2, "test_acc": 0.5}, row_kind="final",
                    status="completed", trial_id=trial_id)


def test_a_final_phase_not_built_from_the_completed_search_is_discarded(tmp_path):
    """Final rows of a phase built from something else (baselines only, at another budget) go, with their
    experiment; search rows stay; the same runs again keep everything."""
    storage = Storage.of(tmp_path)
    search_ctx, final_ctx = RowContext("s", "search", "mini", "b", "h"), RowContext("s", "final", "mini", "b", "h")
    writer = ResultsWriter.shared(storage, "s")
    search = make_row(search_ctx, {"config": {"task": "shapes", "method": "spt-lora"}, "epoch": 2, "epochs": 2,
                                   "val_acc": 0.3}, row_kind="trial", status="completed", trial_id="t1")
    for row in (search, _final_row(final_ctx, "x1", "lora", 18400)):
        writer.put(row)
    writer.flush()
    (tmp_path / "tune" / "s-final" / "x1").mkdir(parents=True)
    runs = [{"task": "shapes", "label": "best", "seed": 42, "budget": 10400},
            {"task": "shapes", "label": "lora", "seed": 42, "budget": 10400}]
    try:
        align_final(storage, "s", runs, {"epochs": 2}, {"shapes": "t1"}, writer)
        kinds = Counter((r["phase"], r["row_kind"]) for r in read_results(storage, "s", dedup=False).to_pylist())
        assert kinds == {("search", "trial"): 1} and not (tmp_path / "tune" / "s-final").exists()
        assert read_final_record(storage, "s")["selected_trials"] == {"shapes": "t1"}
        rebuilt = _final_row(final_ctx, "y1", "lora", 10400)  # same row id as the discarded row: written
        writer.put(rebuilt)
        writer.flush()
        align_final(storage, "s", runs, {"epochs": 2}, {"shapes": "t1"}, writer)  # unchanged: kept
        finals = [r for r in read_results(storage, "s").to_pylist() if r["phase"] == "final"]
        assert [(r["trial_id"], r["budget"]) for r in finals] == [("y1", 10400)]
        align_final(storage, "s", runs[:1], {"epochs": 2}, {"shapes": "t1"}, writer)  # changed: discarded
        assert not [r for r in read_results(storage, "s").to_pylist() if r["phase"] == "final"]
    finally:
        writer.close()
