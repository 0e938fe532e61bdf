"""`spt-ray results / plot / export / evaluate` on an object store: an S3-compatible server (moto's server
mode) on 127.0.0.1, a real sweep's storage copied into its bucket, and every read compared with the same
command on the local copy (which test_cli checks against the driver)."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from spt_ray.cli import main
from tests.conftest import CLI_SWEEP

pytestmark = pytest.mark.slow
moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def s3_endpoint():
    """host:port of a moto S3 server on loopback, with dummy credentials in this process's environment."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def local_sweep(cli_sweep) -> Path:
    """The session's tiny real sweep (conftest.py's cli_sweep): 2 SPT trials on count, one final seed of the
    selected config and of the linear and LoRA baselines."""
    return cli_sweep


def _s3(endpoint: str):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True)


@pytest.fixture(scope="module")
def bucket(s3_endpoint, local_sweep) -> str:
    """The sweep's storage tree copied into s3://spt/sweeps/a; its URI as a user passes it to --storage."""
    import pyarrow.fs as pafs

    fs = _s3(s3_endpoint)
    fs.create_dir("spt")
    pafs.copy_files(str(local_sweep), "spt/sweeps/a", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return f"s3://spt/sweeps/a?endpoint_override={s3_endpoint}&scheme=http"


@pytest.mark.parametrize("report", [["best"], ["pareto"], ["final"],
                                    ["query", "SELECT task, phase, trial_id, val_acc FROM results ORDER BY ALL"]])
def test_reports_on_the_bucket_equal_the_local_ones(bucket, local_sweep, capsys, report):
    code, remote, err = run_cli(capsys, "results", report[0], "--storage", bucket, "--format", "json", *report[1:])
    assert code == 0, err
    _, local, _ = run_cli(capsys, "results", report[0], "--storage", local_sweep, "--format", "json", *report[1:])
    assert json.loads(remote) == json.loads(local) and json.loads(remote)


def test_plot_from_the_bucket(bucket, capsys, tmp_path):
    code, out, err = run_cli(capsys, "results", "plot", "--storage", bucket, "--out", tmp_path)
    assert code == 0, err
    pngs = {p.name: p.stat().st_size for p in tmp_path.glob("*.png")}
    assert {"pareto.png", "methods.png", "sensitivity_count.png"} <= set(pngs)
    assert all(size > 5000 for size in pngs.values())
    # methods.png draws the final phase's test accuracy of the selected config beside the baseline
    from spt_ray.plots import method_bars
    from spt_ray.report import selection_of
    from spt_ray.results import read_results
    from spt_ray.storage import Storage

    storage = Storage.of(bucket)
    table = read_results(storage, CLI_SWEEP)
    bars, what = method_bars(table, selection_of(storage, CLI_SWEEP, table))
    final = {r["label"]: r for r in table.to_pylist() if r["row_kind"] == "final"}
    slots = {name.split(" (x")[0] for name in bars["count"]}  # "lora (x1.12 budget)" where budgets differ
    assert "test" in what and slots == {"SPT (selected)", "linear", "lora"} and len(bars["count"]) == 3
    assert bars["count"]["SPT (selected)"].values == (final["best"]["test_acc"],)
    assert bars["count"]["linear"].params == 0 and bars["count"]["SPT (selected)"].params > 0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _final_rows(bucket, capsys) -> dict[str, dict]:
    code, out, _ = run_cli(capsys, "results", "query", "--storage", bucket, "--format", "json",
                           "SELECT label, trial_id, test_acc FROM results WHERE row_kind = 'final'")
    return {r["label"]: r for r in json.loads(out)}


def test_export_and_evaluate_through_the_bucket(bucket, local_sweep, s3_endpoint, capsys, tmp_path):
    import pyarrow.fs as pafs

    final = _final_rows(bucket, capsys)["best"]
    code, out, err = run_cli(capsys, "export", "--storage", bucket, "--trial-id", final["trial_id"], "--out",
                             tmp_path / "remote")
    assert code == 0, err
    assert run_cli(capsys, "export", "--storage", local_sweep, "--trial-id", final["trial_id"], "--out",
                   tmp_path / "local")[0] == 0
    assert _sha(tmp_path / "remote" / "delta.safetensors") == _sha(tmp_path / "local" / "delta.safetensors")

    # the delta itself on the bucket: evaluate reads it from there
    fs = _s3(s3_endpoint)
    pafs.copy_files(str(tmp_path / "local"), "spt/deltas/best", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    delta_uri = f"s3://spt/deltas/best?endpoint_override={s3_endpoint}&scheme=http"
    code, out, err = run_cli(capsys, "evaluate", "--delta", delta_uri)
    assert code == 0, err
    result = json.loads(out)
    assert result["split"] == "test" and result["acc"] == result["recorded_acc"] == final["test_acc"]


def test_merged_export_from_the_bucket_scores_like_the_final_run(bucket, capsys, tmp_path):
    """`export --merged` of the linear probe's final run (a plan that always folds; SPT's selected plan may hold
    Adapters): the printed timm.create_model line, run as printed, scores the run's recorded test accuracy."""
    import timm  # noqa: F401 - the printed line uses it
    import torch

    from spt_core.experiment import TaskRef, make_loader

    final = _final_rows(bucket, capsys)["linear"]
    code, out, err = run_cli(capsys, "export", "--storage", bucket, "--trial-id", final["trial_id"], "--out",
                             tmp_path / "d", "--merged")
    assert code == 0, err
    line = out.split("merged timm weights: ", 1)[1].strip()
    model = eval(line).eval()  # noqa: S307 - the line the CLI tells a user to run
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    loader = make_loader(TaskRef(**meta["task"]), meta["eval_split"], batch_size=128, train=False, seed=0)
    with torch.no_grad():
        hits = [(model(x).argmax(1) == y).sum().item() for x, y in loader]
    assert sum(hits) / len(loader.dataset) == pytest.approx(final["test_acc"])


def test_unknown_trial_on_the_bucket_is_one_line(bucket, capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "--storage", bucket, "--trial-id", "nope", "--out", tmp_path / "d")
    assert code == 2 and "no trial 'nope'" in err and len(err.strip().splitlines()) == 1, err
    empty = bucket.replace("sweeps/a", "sweeps/none")
    code, _, err = run_cli(capsys, "export", "--storage", empty, "--trial-id", "x", "--out", tmp_path / "d")
    assert code == 2 and "no Tune experiments" in err, err
