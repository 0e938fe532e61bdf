"""Experiment trackers through Ray Tune's integrations (`--callback`, `callbacks` in the spec, callback
objects in the Python API): names checked before anything runs, a missing package named with its pip
command, and one real sweep whose TensorBoard events, MLflow runs (local SQLite store) and W&B offline runs
hold the same numbers as the Parquet results. MLflow and W&B are optional extras: their checks are skipped,
with the reason, where they are not installed."""

from __future__ import annotations

import json
import struct
import tomllib
from pathlib import Path

import pytest
import yaml

from spt_ray.cli import main
from spt_ray.launch import add_tune_args, spec_from_args
from spt_ray.spec import SweepSpec
from spt_ray.trackers import TRACKERS, parse_callbacks
from tests.searched_sweep import INSTALLED, NAME, TASKS, TRIALS_PER_TASK, Recorder

ROOT = Path(__file__).resolve().parents[1]


def test_names_are_checked_and_deduplicated():
    assert parse_callbacks(["tensorboard, TensorBoard", "tensorboard"]) == ("tensorboard",)
    assert parse_callbacks(None) == () and parse_callbacks("") == ()
    with pytest.raises(ValueError, match=r"unknown callback 'neptune'; choose from wandb, mlflow, tensorboard"):
        parse_callbacks("tensorboard,neptune")
    with pytest.raises(ValueError, match="neither a tracker name"):
        parse_callbacks([42])
    rec = Recorder()
    assert parse_callbacks([rec, "tensorboard"]) == (rec, "tensorboard")


@pytest.mark.parametrize("name", [n for n in TRACKERS if n != "tensorboard"])
def test_a_missing_tracker_is_one_line_with_the_pip_command(name, capsys, tmp_path):
    if INSTALLED[name]:
        pytest.skip(f"{TRACKERS[name].package} is installed here; the missing-package path needs it absent")
    storage = tmp_path / "store"
    code = main(["tune", "--callback", name, "--storage", str(storage), "--data-root", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == (f"spt-ray tune: error: --callback {name} needs the {TRACKERS[name].package} package; install it "
                   f"with `pip install 'spt-ray[{name}]'` (or `pip install {TRACKERS[name].pip}`)")
    assert not storage.exists()  # refused before anything was written


def test_unknown_callback_via_the_cli_is_exit_2(capsys, tmp_path):
    code = main(["tune", "--callback", "tensorbored", "--storage", str(tmp_path / "s"), "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown callback 'tensorbored'" in err and len(err.strip().splitlines()) == 1


def test_flags_and_config_file_merge(tmp_path):
    import argparse

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"callbacks": ["tensorboard"]}))
    parser = add_tune_args(argparse.ArgumentParser())
    args = parser.parse_args(["--config", str(config), "--callback", "tensorboard", "-v", "--storage",
                              str(tmp_path / "s"), "--data-root", str(tmp_path)])
    spec = SweepSpec.from_dict(spec_from_args(args, "mini"))
    assert spec.callbacks == ("tensorboard",) and spec.verbose is True
    rec = Recorder()
    api = spec.with_overrides(callbacks=("tensorboard", rec))
    assert api.to_dict()["callbacks"] == ["tensorboard", "Recorder"]  # spec.json records names, not objects
    assert SweepSpec.from_dict({**api.to_dict(), "callbacks": ["tensorboard"]}).callbacks == ("tensorboard",)


def test_each_tracker_is_an_optional_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, tracker in TRACKERS.items():
        assert any(req.lower().startswith(tracker.pip.lower()) for req in extras[name]), (name, extras.get(name))


# ---- one real sweep with every installed tracker --------------------------------------------------------
def tensorboard_scalars(folder: Path, tag: str) -> dict[int, float]:
    """step -> value of `tag` from the TFRecord event files in `folder` (framing read by hand)."""
    from tensorboardX.proto import event_pb2

    out: dict[int, float] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.tag == tag:
                    out[event.step] = value.simple_value
    return out


@pytest.fixture(scope="module")
def tracked(searched_sweep):
    """The session's search-only sweep (tests/searched_sweep.py) with every installed tracker and a Recorder:
    its storage, each trial's val_acc by iteration from the Parquet rows, and the Recorder."""
    from spt_ray.results import read_results

    rows = [r for r in read_results(str(searched_sweep.storage), NAME).to_pylist() if r["row_kind"] == "report"]
    per_trial: dict[str, dict[int, float]] = {}
    for r in rows:
        per_trial.setdefault(r["trial_id"], {})[r["iteration"]] = r["val_acc"]
    assert len(per_trial) == len(TASKS) * TRIALS_PER_TASK
    return searched_sweep.storage, per_trial, searched_sweep.recorder


@pytest.mark.slow
def test_api_callback_objects_hear_every_trial(tracked):
    _, per_trial, recorder = tracked
    assert sorted(recorder.completed) == sorted(per_trial)


@pytest.mark.slow
def test_tensorboard_events_hold_the_parquet_numbers(tracked):
    storage, per_trial, _ = tracked
    for trial_id, expected in per_trial.items():
        (folder,) = (storage / "tune").glob(f"*/*-{trial_id}")  # <sweep experiment>/<trial name>
        got = tensorboard_scalars(folder, "ray/tune/val_acc")
        assert got == pytest.approx(expected, abs=1e-6)  # float32 in the event file


@pytest.mark.slow
@pytest.mark.skipif(not INSTALLED["mlflow"], reason="mlflow not installed (pip install 'spt-ray[mlflow]')")
def test_mlflow_local_store_holds_the_parquet_numbers(tracked):
    from mlflow.tracking import MlflowClient

    storage, per_trial, _ = tracked
    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")  # the default for a local storage
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == len(per_trial)
    for run in runs:
        assert run.data.tags["sweep"] == NAME and run.data.params["phase"] == "search"
        trial_id = run.data.tags["trial_name"].rsplit("-", 1)[-1]
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
        assert history == pytest.approx(per_trial[trial_id], abs=1e-9)
        assert float(run.data.params["lr"]) > 0  # the trial's config as parameters


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file (`run-<id>.wandb`), read by hand: a 7-byte header, then
    LevelDB-log blocks of 32 KiB whose chunks (crc32, length, type) carry protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, rows = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record.FromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.mark.slow
@pytest.mark.skipif(not INSTALLED["wandb"], reason="wandb not installed (pip install 'spt-ray[wandb]')")
def test_wandb_offline_runs_hold_the_parquet_numbers(tracked):
    storage, per_trial, _ = tracked
    latest: dict[str, Path] = {}  # W&B run id = Tune's trial id; a restarted trial (a node lost) logs again
    for run in sorted((storage / "wandb").rglob("offline-run-*")):  # names sort by start time
        latest[run.name.rsplit("-", 1)[-1]] = run
    assert sorted(latest) == sorted(per_trial)
    for trial_id, run in latest.items():
        (log,) = run.glob("*.wandb")
        history = {row["training_iteration"]: row["val_acc"] for row in wandb_history(log) if "val_acc" in row}
        assert history == pytest.approx(per_trial[trial_id], abs=1e-9)
