"""Every `spt-ray` command end to end on a tiny mini suite, plus its bad-input path (one line, exit 2)."""

import json
from pathlib import Path

import pytest

from spt_ray.cli import main
from tests.conftest import CLI_SWEEP

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def backbone_flags(backbone) -> list[str]:
    return ["--weights", backbone.weights] if backbone.weights else []


@pytest.fixture
def sweep(cli_sweep) -> Path:
    """The session's tiny sweep through `spt-ray tune` (conftest.py's cli_sweep): search (2 SPT trials on count)
    and a one-seed final phase with 2 baselines."""
    return cli_sweep


def test_tune_prints_spt_against_baselines(sweep, capsys):
    code, out, _ = run_cli(capsys, "results", "best", "--storage", sweep, "--format", "json")
    best = json.loads(out)
    assert code == 0 and len(best) == 1 and best[0]["task"] == "count"
    assert best[0]["method"].startswith("spt-") and best[0]["seeds"] == 1 and best[0]["test_mean"] is not None


def test_results_query_and_pareto(sweep, capsys):
    code, out, _ = run_cli(capsys, "results", "query", "--storage", sweep, "--format", "csv",
                           "SELECT phase, row_kind, count(*) AS n FROM results GROUP BY ALL ORDER BY ALL")
    rows = {tuple(line.split(",")[:2]): int(line.split(",")[2]) for line in out.strip().splitlines()[1:]}
    assert code == 0 and rows[("search", "trial")] == 2 and rows[("final", "final")] == 3
    code, out, _ = run_cli(capsys, "results", "pareto", "--storage", sweep, "--format", "json")
    front = json.loads(out)
    assert code == 0 and front
    params = [r["trainable_params"] for r in front]
    assert params == sorted(params)


def test_reports_agree_with_the_driver_and_flag_unequal_budgets(sweep, capsys):
    driver = json.loads((sweep / "sweeps" / CLI_SWEEP / "result.json").read_text())
    code, out, _ = run_cli(capsys, "results", "best", "--storage", sweep, "--format", "json")
    assert code == 0 and [r["trial_id"] for r in json.loads(out)] == [driver["best"]["count"]["trial_id"]]
    code, out, _ = run_cli(capsys, "results", "pareto", "--storage", sweep, "--format", "json")
    assert [r["trial_id"] for r in json.loads(out)] == [r["trial_id"] for r in driver["pareto"]["count"]]
    code, out, _ = run_cli(capsys, "results", "final", "--storage", sweep, "--format", "json")
    final = {r["label"]: r for r in json.loads(out)}
    spt = driver["best"]["count"]["trainable_params"]
    assert code == 0 and final["best"]["trainable_params"] == spt and final["best"]["budget_ratio"] == 1.0
    assert final["linear"]["budget_ratio"] is None and final["linear"]["equal_budget"] is None
    ratio = final["lora"]["trainable_params"] / spt  # the run's exact count over SPT's
    assert final["lora"]["budget_ratio"] == pytest.approx(ratio)
    assert final["lora"]["equal_budget"] == (abs(ratio - 1) <= 0.10)


def test_results_plot_writes_pngs(sweep, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "results", "plot", "--storage", sweep, "--out", tmp_path)
    assert code == 0
    pngs = {p.name: p.stat().st_size for p in tmp_path.glob("*.png")}
    assert {"pareto.png", "methods.png", "sensitivity_count.png"} <= set(pngs)
    assert all(size > 5000 for size in pngs.values())


def test_export_then_evaluate_reproduces_the_accuracy(sweep, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "results", "query", "--storage", sweep, "--format", "json",
                           "SELECT trial_id, test_acc FROM results WHERE row_kind = 'final' AND label = 'best'")
    final = json.loads(out)[0]
    code, out, _ = run_cli(capsys, "export", "--storage", sweep, "--trial-id", final["trial_id"], "--out",
                           tmp_path / "delta")
    assert code == 0 and "KiB" in out
    assert {p.name for p in (tmp_path / "delta").iterdir()} == {"delta.safetensors", "plan.json", "meta.json"}
    code, out, _ = run_cli(capsys, "evaluate", "--delta", tmp_path / "delta")
    result = json.loads(out)
    assert code == 0 and result["split"] == "test"
    assert result["acc"] == result["recorded_acc"] == final["test_acc"]


def test_sensitivity_then_plan(ray_mini_root, ray_backbone, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "sensitivity", "--task", "shapes", "--data-root", ray_mini_root, "--num-batches",
                           "2", "--out", tmp_path, *backbone_flags(ray_backbone))
    assert code == 0
    smap = next(tmp_path.glob("shapes-*.safetensors"))
    code, out, _ = run_cli(capsys, "plan", "--sensitivity", smap, "--budget", "10k", "--out", tmp_path / "p.json")
    plan = json.loads((tmp_path / "p.json").read_text())
    assert code == 0 and "total" in out and 9_500 <= plan["trainable_params"] <= 10_000


def test_plan_from_released_allocations(capsys):
    from spt_core.released import default_released_dir

    assert default_released_dir().is_dir()  # shipped in the package (spt_core/assets/released)
    code, out, _ = run_cli(capsys, "plan", "--source", "released", "--task", "cifar", "--budget", "0.4M")
    assert code == 0 and "blocks.11" in out


def test_data_mini_and_cluster_validate(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "data", "mini", "--out", tmp_path, "--tasks", "cells")
    assert code == 0 and "cells" in out and (tmp_path / "cells" / "train800.txt").is_file()
    code, out, _ = run_cli(capsys, "cluster", "validate", ROOT / "cluster" / "cluster.yaml")
    assert code == 0 and out.startswith("OK")


@pytest.mark.parametrize("argv,needle", [
    (["tune", "--suite", "vtab", "--storage", "{tmp}/s"], "--data-root is required"),
    (["tune", "--tasks", "nope", "--storage", "{tmp}/s", "--data-root", "{tmp}"], "nope"),
    (["sensitivity", "--task", "shapes", "--data-root", "{tmp}/missing"], "is not a folder"),
    (["sensitivity", "--task", "shapes", "--data-root", "{tmp}"], "shapes"),
    (["plan", "--source", "released", "--task", "nope", "--budget", "0.4M"], "nope"),
    (["plan", "--sensitivity", "{tmp}/none.safetensors", "--budget", "1000"], "does not exist"),
    (["results", "best", "--storage", "{tmp}"], "no results"),
    (["export", "--storage", "{tmp}", "--trial-id", "x", "--out", "{tmp}/d"], "no Tune experiments"),
    (["evaluate", "--delta", "{tmp}"], "missing"),
    (["data", "mini", "--out", "{tmp}", "--tasks", "nope"], "nope"),
    (["data", "probe", "--out", "{tmp}", "--methods", "linear,nope"], "nope"),
    (["cluster", "validate", "{tmp}/none.yaml"], "none.yaml"),
    (["backbone", "info", "--weights", "{tmp}/none.pth"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    code, out, err = run_cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2, (out, err)
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_unparseable_budget_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--source", "released", "--task", "cifar", "--budget", "lots"])
    assert exit_info.value.code == 2 and "lots" in capsys.readouterr().err
