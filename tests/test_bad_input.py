"""The bad-input campaign: each case runs the real `spt-ray` CLI in-process (`spt_ray.cli.main(argv)`) on
one defect in data, weights, configs, budgets, resources, storage, deltas, queries or cluster files, and
must end with exit code 2, exactly one line on stderr that names the problem and its fix (the `expect`
substrings), no traceback, and nothing written to the output / storage folder it was given.

Sweeps must be refused before Ray starts: a tripwire replaces the driver's Ray session, so a case that
slips through validation fails at once instead of running (or hanging) a sweep. The one defect that
needs a running Ray (a GPU asked of a cluster without one) runs in a subprocess and is marked slow.
Integrity checks at the end: an exported delta whose values changed is refused, and a results write that
fails on a full disk leaves no hidden temporary file.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from spt_ray.cli import main
from tests.bad_input_setups import (TASK, Case, Env, case, cluster_defect, corrupt_header, delta_copy, drop_checksum,
                                    edit_list, flip_value, kernel_2d, malicious_pickle, other_backbone, read_only,
                                    truncate_first_image, write_file, wrong_shapes, yaml_config)
from tests.test_cluster import CLOUD_DEFECTS

ROOT = Path(__file__).resolve().parents[1]


# ---- the table --------------------------------------------------------------------------------------
SENS = f"sensitivity --task {TASK} --num-batches 1 --batch-size 4 --out {{out}}"
TUNE = f"tune --tasks {TASK} --data-root {{data}} --storage {{out}}"
TUNE_CFG = TUNE + " --config {tmp}/sweep.yaml"
PLAN = "plan --sensitivity {sens} --out {out}/plan.json"
EVAL = "evaluate --delta {tmp}/delta --data-root {data}"
QUERY = "results query --storage {results}"

CASES = [
    # data
    case("data-root missing", SENS + " --data-root {tmp}/nowhere", "is not a folder", "point it at"),
    case("task folder missing", SENS.replace(TASK, "count") + " --data-root {data}", "count", "fix:"),
    case("unknown task", SENS.replace(TASK, "nope") + " --data-root {data}", "unknown task 'nope'", "known tasks"),
    case("malformed list line", SENS + " --data-root {tmp}/data", "malformed line", "fix:",
         setup=edit_list(lambda lines: lines[:3] + ["no label here"] + lines[3:])),
    case("label out of range", SENS + " --data-root {tmp}/data", "label 99 outside", "fix:",
         setup=edit_list(lambda lines: [lines[0].rsplit(" ", 1)[0] + " 99"] + lines[1:])),
    case("missing image", SENS + " --data-root {tmp}/data", "not found", "fix:",
         setup=edit_list(lambda lines: lines + ["images/nope.png 1"])),
    case("truncated image", SENS + " --data-root {tmp}/data", "cannot read image", "fix:",
         setup=truncate_first_image),
    case("empty split", SENS + " --data-root {tmp}/data", "lists no images", "fix:", setup=edit_list(lambda _: [])),
    case("sweep over a malformed list", TUNE.replace("{data}", "{tmp}/data"), "malformed line", "fix:",
         setup=edit_list(lambda lines: lines[:3] + ["no label here"] + lines[3:])),
    # weights
    case("weights missing", "backbone info --weights {tmp}/none.pth", "does not exist", "give a .npz"),
    case("garbage .pth", "backbone info --weights {tmp}/w.pth", "cannot read checkpoint", "fix:",
         setup=write_file("w.pth", os.urandom(2048))),
    case("garbage .safetensors", "backbone info --weights {tmp}/w.safetensors", "cannot read checkpoint", "fix:",
         setup=write_file("w.safetensors", os.urandom(2048))),
    case("garbage .npz", "backbone info --weights {tmp}/w.npz", "cannot read checkpoint", "fix:",
         setup=write_file("w.npz", os.urandom(2048))),
    case("empty checkpoint", "backbone info --weights {tmp}/w.pth", "cannot read checkpoint", "fix:",
         setup=write_file("w.pth", b"")),
    case("unsupported format", "backbone info --weights {tmp}/w.txt", "unsupported format", "fix:",
         setup=write_file("w.txt", "weights")),
    case("pickle with code", "backbone info --weights {tmp}/evil.pth", "cannot read checkpoint", "fix:",
         setup=malicious_pickle),
    case("wrong shapes", "backbone info --weights {tmp}/tiny.safetensors", "does not fit the model",
         "fix: use weights of this architecture", setup=wrong_shapes),
    case("2-D npz embedding kernel", "backbone info --weights {tmp}/vit2d.npz",
         "embedding/kernel has shape (48, 96), expected (patch, patch, 3, width)", "fix:", setup=kernel_2d),
    case("unknown backbone", "backbone info --backbone nope_vit", "nope_vit", "fix:"),
    case("sweep on garbage weights", TUNE + " --weights {tmp}/w.pth", "cannot read checkpoint", "fix:",
         setup=write_file("w.pth", os.urandom(2048))),
    # configs
    case("config missing", TUNE + " --config {tmp}/none.yaml", "does not exist", "pass the path"),
    case("YAML syntax error", TUNE_CFG, "invalid YAML at line 2, column", "check indentation",
         setup=yaml_config("num_samples: 2\n  tasks: [a\n")),
    case("config is a list", TUNE_CFG, "top level is a list", "key: value", setup=yaml_config("- a\n- b\n")),
    case("unknown key", TUNE_CFG, "'num_sample' (did you mean 'num_samples'?)", "allowed:",
         setup=yaml_config("num_sample: 2\n")),
    case("unknown train key", TUNE_CFG, "'lrr' (did you mean 'lr'?)", "allowed:",
         setup=yaml_config("train:\n  lrr: 0.1\n")),
    case("num_samples text", TUNE_CFG, "num_samples must be an integer, got 'abc'", "without quotes",
         setup=yaml_config("num_samples: abc\n")),
    case("max_concurrent quoted", TUNE_CFG, "max_concurrent must be an integer, got '2' (str)", "without quotes",
         setup=yaml_config('max_concurrent: "2"\n')),
    case("epochs quoted", TUNE_CFG, "epochs must be an integer, got '3'", "without quotes",
         setup=yaml_config('train:\n  epochs: "3"\n')),
    case("final_seeds text", TUNE_CFG, "final_seeds[0] must be an integer", "without quotes",
         setup=yaml_config("final_seeds: [a]\n")),
    case("lr NaN", TUNE_CFG, "lr must be a finite number, got nan", "plain number",
         setup=yaml_config("train:\n  lr: .nan\n")),
    case("final_train lr inf", TUNE_CFG, "`final_train`: lr must be a finite number", "plain number",
         setup=yaml_config("final_train:\n  lr: .inf\n")),
    case("space range inf", TUNE_CFG, "search space `lr`: high must be a finite number", "plain number",
         setup=yaml_config("space:\n  lr: [1.0e-4, .inf]\n")),
    case("space range text", TUNE_CFG, "search space `alpha`: low must be a number, got 'x'", "plain number",
         setup=yaml_config("space:\n  alpha: [x, 4]\n")),
    case("scheduler factor inf", TUNE_CFG, "scheduler.reduction_factor must be a finite number", "plain number",
         setup=yaml_config("scheduler:\n  reduction_factor: .inf\n")),
    case("ranking margin NaN", TUNE_CFG, "sensitivity.ranking_margin must be a finite number", "plain number",
         setup=yaml_config("sensitivity:\n  ranking_margin: .nan\n")),
    case("drop path NaN", TUNE_CFG, "backbone.drop_path_rate must be a finite number", "plain number",
         setup=yaml_config("backbone:\n  drop_path_rate: .nan\n")),
    case("flag as text", TUNE_CFG, "search_baselines must be true or false, got 'no'", "without quotes",
         setup=yaml_config('search_baselines: "no"\n')),
    case("address as a number", TUNE_CFG, "address must be text, got 6379", "put it in quotes",
         setup=yaml_config("address: 6379\n")),
    case("nothing to run", TUNE + " --num-samples 0 --no-final", "runs nothing", "drop --no-final"),
    case("final seeds not numbers", TUNE + " --final-seeds 4x", "--final-seeds", "--help"),
    # budgets
    case("budget inf", PLAN + " --budget inf", "budget 'inf' is not a finite number", "400k"),
    case("budget 1e999", PLAN + " --budget 1e999", "budget '1e999' is not a finite number", "400k"),
    case("budget NaN", PLAN + " --budget nan", "budget 'nan' is not a finite number", "400k"),
    case("budget negative", PLAN + " --budget -5", "budget '-5' is not a parameter count >= 1", "400k"),
    case("budget text", PLAN + " --budget lots", "budget 'lots'", "400k"),
    case("budget above the model", PLAN + " --budget 1e12", "exceeds the", "use full fine-tuning instead"),
    case("alpha inf", PLAN + " --budget 10k --alpha inf", "--alpha: value 'inf' is not a finite number", "give e.g."),
    case("space budget above the model", TUNE_CFG, "exceeds the backbone's", "lower `space.budget`",
         setup=yaml_config("space:\n  budget: [1000, 1.0e+12]\n  budget_unit: params\n")),
    # resources
    case("cpus NaN", TUNE + " --cpus-per-trial nan", "resources.cpu must be a finite number, got nan", "plain number"),
    case("cpus inf", TUNE + " --cpus-per-trial inf", "resources.cpu must be a finite number, got inf", "plain number"),
    case("cpus zero", TUNE + " --cpus-per-trial 0", "a trial needs cpu > 0", "--cpus-per-trial"),
    case("gpus negative", TUNE + " --gpus-per-trial -1", "gpu >= 0", "--gpus-per-trial"),
    case("gpus fractional above 1", TUNE + " --gpus-per-trial 1.5", "more than one GPU must be a whole number",
         "below 1"),
    case("custom resource NaN", TUNE_CFG, "resources.custom.tpu must be a finite number", "plain number",
         setup=yaml_config("resources:\n  custom: {tpu: .nan}\n")),
    case("max_concurrent zero", TUNE + " --max-concurrent 0", "max_concurrent must be >= 1", "--max-concurrent 1"),
    case("checkpoint_every zero", TUNE + " --checkpoint-every 0", "checkpoint_every must be >= 1",
         "--checkpoint-every 1"),
    # storage
    # (refused by the sweep's preflight, or else by the first write: the wording differs, the content not)
    case("storage is a file", TUNE, "file", "folder", "--storage", setup=lambda env: env.out.write_text("x")),
    case("storage under a file", TUNE.replace("{out}", "{out}/sub"), "file", "folder", "--storage",
         setup=lambda env: env.out.write_text("x")),
    case("storage read-only", TUNE, "writable", "--storage", setup=read_only),
    case("export from a file", "export --storage {tmp}/f --trial-id x --out {out}", "no Tune experiments",
         "pass the --storage", setup=write_file("f", "x")),
    # deltas
    case("delta folder missing", "evaluate --delta {tmp}/none", "missing", "export the trial again"),
    case("delta values changed", EVAL, "changed since export: sha256", "re-export it",
         setup=delta_copy(flip_value)),
    case("delta header corrupted", EVAL, "changed since export: sha256", "re-export it",
         setup=delta_copy(corrupt_header)),
    case("old delta header corrupted", EVAL, "unreadable delta (SafetensorError", "export it again",
         setup=delta_copy(drop_checksum(corrupt_header))),
    case("delta plan missing", EVAL, "missing plan.json", "export the trial again",
         setup=delta_copy(lambda d: (d / "plan.json").unlink())),
    case("delta plan not JSON", EVAL, "unreadable delta", "export it again",
         setup=delta_copy(lambda d: (d / "plan.json").write_text("{"))),
    case("delta on another backbone", EVAL + " --weights {tmp}/other.safetensors", "was trained on backbone",
         "pass --weights with the original file",
         setup=lambda env: (delta_copy(lambda d: None)(env), other_backbone(env))),
    # queries
    case("SQL syntax error", QUERY + " SELEC", "query failed", "syntax error"),
    case("SQL unknown column", QUERY + ' "SELECT nope FROM results"', "query failed", "nope"),
    case("SQL writes a file", QUERY + """ "COPY (SELECT 1) TO '{out}/x.csv'" """, "query failed", "",
         setup=lambda env: env.out.mkdir()),
    case("no results there", "results best --storage {tmp}", "no results", "run `spt-ray tune` first"),
    # cluster files
    case("cluster file missing", "cluster validate {tmp}/none.yaml", "file not found", "fix:"),
    case("cluster YAML invalid", "cluster validate {tmp}/cluster.yaml", "invalid YAML", "fix:",
         setup=write_file("cluster.yaml", "cluster_name: spt\nprovider:\n  type: aws\n   region: x\n")),
    *[case(f"cluster {d}", "cluster validate {tmp}/cluster.yaml", CLOUD_DEFECTS[d][1][0], "fix:",
           setup=cluster_defect(d))
      for d in ("fractional GPU", "unknown provider", "public dashboard", "secret key", "repo not synced")],
]


# ---- running a case ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """One tiny task, its sensitivity map, an exported delta, and a storage with result rows (read-only)."""
    from spt_core.data.mini import write_mini_suite
    from spt_core.experiment import BackboneRef, TaskRef, compute_task_sensitivity, load_backbone
    from spt_core.export import save_delta
    from spt_core.layout import ModelLayout
    from spt_core.baselines import linear_probe
    from spt_core.surgery import apply_plan

    base = tmp_path_factory.mktemp("bad-input")
    data = write_mini_suite(base / "data", tasks=[TASK], sizes=(16, 8, 8))
    task, backbone = TaskRef("mini", TASK, str(data)), BackboneRef()
    sens = base / "shapes.safetensors"
    compute_task_sensitivity(task, backbone, num_batches=1, batch_size=4, progress=False).save(sens)
    model, info = load_backbone(backbone, task, seed=0)
    apply_plan(model, linear_probe(ModelLayout.from_model(model)))
    meta = {"task": task.to_dict(), "backbone": backbone.to_dict(), "backbone_hash": info["weights_sha256"],
            "eval_split": "val200", "eval_batch_size": 8, "phase": "search", "metrics": {}}
    delta = save_delta(model, base / "delta", meta=meta)
    return {"data": Path(data), "sens": sens, "delta": delta, "results": _results_storage(base / "results")}


def _results_storage(root: Path) -> Path:
    from spt_ray.results import ResultsWriter, RowContext, make_row
    from spt_ray.storage import Storage

    writer = ResultsWriter(Storage.of(root), "s")
    writer.start()
    ctx = RowContext("s", "search", "mini", "spt-mini-vit", "h")
    writer.put(make_row(ctx, {"config": {"task": TASK, "method": "linear"}, "epoch": 1, "val_acc": 0.5},
                        row_kind="report", status="running", trial_id="t1"))
    writer.close()
    return root


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Tripwire: every sweep here must be refused before Ray starts."""
    import spt_ray.driver

    def ray_session(*_: Any, **__: Any):
        raise AssertionError("the sweep passed validation and reached Ray")
    monkeypatch.setattr(spt_ray.driver, "ray_session", ray_session)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit from parse_args
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def files_under(path: Path) -> list[str]:
    if path.is_file():
        return []  # a storage that is a file: the case put it there; nothing may be added next to it
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_with_the_fix_and_writes_nothing(case: Case, shared, tmp_path, capsys):
    env = Env(tmp_path, tmp_path / "out", **shared)
    if case.setup:
        case.setup(env)
    try:
        code, out, err = run_cli([env.fill(a) for a in case.argv], capsys)
        lines = err.strip().splitlines()
        assert code == 2, (code, out, err)
        assert len(lines) == 1 and "Traceback" not in err + out, err
        for needle in case.expect:
            assert env.fill(needle) in lines[0], lines[0]
        assert files_under(env.out) == []
    finally:
        if env.out.is_dir():
            subprocess.run(["chattr", "-i", str(env.out)], capture_output=True)
            env.out.chmod(0o755)


def test_the_campaign_covers_every_area():
    assert len(CASES) >= 40


# ---- a defect only a running Ray can see -------------------------------------------------------------
@pytest.mark.slow
def test_gpu_asked_of_a_cluster_without_one(shared, tmp_path):
    """A fresh local Ray without GPUs and trials that each need one: refused, not waited on forever."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    env = {**os.environ, "RAY_TMPDIR": f"/tmp/ray-bad-{os.getpid()}", "SPT_NO_PROGRESS": "1"}
    argv = ["tune", "--tasks", TASK, "--data-root", str(shared["data"]), "--storage", str(out), "--epochs", "1",
            "--gpus-per-trial", "1", "--address", "local"]
    try:
        proc = subprocess.run([sys.executable, "-m", "spt_ray.cli", *argv], capture_output=True, text=True,
                              timeout=240, cwd=ROOT, env=env)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    lines = [line for line in proc.stderr.strip().splitlines() if "spt-ray tune: error" in line]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "GPU=1" in lines[0] and "--gpus-per-trial" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert files_under(out) == []


# ---- integrity --------------------------------------------------------------------------------------
def _write_one_row(root: Path) -> tuple[Any, str]:
    """One result row through a real ResultsWriter; returns the writer and the error flush() reported."""
    from spt_ray.results import ResultsWriter, RowContext, make_row
    from spt_ray.storage import Storage

    writer = ResultsWriter(Storage.of(root), "s")
    writer.start()
    ctx = RowContext("s", "search", "mini", "spt-mini-vit", "h")
    writer.put(make_row(ctx, {"config": {"task": TASK}, "epoch": 1}, row_kind="report", status="running",
                        trial_id="t1"))
    with pytest.raises(RuntimeError) as failed:
        writer.flush()
    with pytest.raises(RuntimeError):  # the failure stays reported when the sweep closes the writer...
        writer.close()
    assert not writer._thread.is_alive()  # ...and the writer thread still stops
    return writer, str(failed.value)


def test_a_full_disk_leaves_no_temporary_results_file(tmp_path, monkeypatch):
    """ENOSPC once the hidden temporary file exists (fault injected into the write's fsync)."""
    from spt_ray import storage as storage_module

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(storage_module.os, "fsync", full_disk)
    writer, message = _write_one_row(tmp_path)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []  # no `.part-*.tmp`, no part file
    assert writer.files_written == writer.rows_written == 0
    assert "No space left on device" in message and "free space there or pass another --storage" in message


def test_an_unwritable_results_folder_leaves_nothing_and_says_so(tmp_path):
    """A real failure, no injection: the sweep's results folder exists but cannot be written to."""
    folder = tmp_path / "results" / "sweep=s"
    folder.mkdir(parents=True)
    read_only(Env(tmp_path, folder, *[tmp_path] * 4))
    try:
        writer, message = _write_one_row(tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)
    assert list(folder.iterdir()) == [] and writer.files_written == 0
    assert "cannot write" in message and "pass another --storage" in message
