"""One selection everywhere: the driver's persisted choice, `spt-ray results best / pareto / final / plot` and
the plots agree on an adversarial table (a baseline and an ASHA-stopped trial above the selected trial on
val, two sweeps in one storage); the query is read-only; equal-budget baselines are within +-10%."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spt_core.baselines import match_uniform
from spt_core.embedded import build_embedded_vit
from spt_core.layout import ModelLayout
from spt_core.sensitivity import Ranking
from spt_core.surgery import apply_plan
from spt_ray.cli import main
from spt_ray.plots import method_bars
from spt_ray.results import ResultsWriter, RowContext, make_row, read_results, summary_row
from spt_ray.selection import final_configs, persist_selection
from spt_ray.spec import SweepSpec
from spt_ray.storage import Storage
from spt_ray.trainable import build_trial_plan

# (trial, task, method, searched, val_acc, params, epochs run of 2) -- sweep "a"
SEARCH_A = [
    ("s1", "shapes", "spt-lora", True, 0.60, 2000, 2),
    ("s2", "shapes", "spt-lora", True, 0.70, 3000, 2),  # the selection: best completed, fewer params on a tie
    ("s3", "shapes", "spt-adapter", True, 0.70, 5000, 2),
    ("s4", "shapes", "spt-lora", True, 0.95, 1000, 1),  # ASHA-stopped after epoch 1: never a candidate
    ("base", "shapes", "full", False, 0.99, 680_000, 2),  # a baseline: never a candidate
    ("s5", "shapes", "spt-adapter", True, 0.65, 1500, 2),
    ("c1", "count", "spt-lora", True, 0.40, 4000, 2),
]
SEARCH_B = [("b1", "shapes", "spt-lora", True, 0.99, 9000, 2)]  # another sweep's better trial
# (task, label, method, seed, test_acc, params, budget_ratio) -- final runs of sweep "a" and "b"
FINAL_A = [("shapes", "best", "spt-lora", 42, 0.80, 3000, 1.0), ("shapes", "best", "spt-lora", 44, 0.60, 3000, 1.0),
           ("shapes", "lora", "lora", 42, 0.50, 1536, 0.512), ("shapes", "full", "full", 42, 0.90, 680_000, None)]
FINAL_B = [("shapes", "best", "spt-lora", 42, 0.10, 9000, 1.0)]


def _trial(ctx: RowContext, trial: str, task: str, method: str, searched: bool, val: float, params: int,
           ran: int) -> dict:
    result = {"trial_id": trial, "training_iteration": ran, "epoch": ran, "epochs": 2, "val_acc": val,
              "trainable_params": params, "config": {"task": task, "method": method, "searched": searched,
                                                     "budget": params, "alpha": 10.0, "rank": 8, "lr": 1e-3,
                                                     "weight_decay": 1e-4, "bits": None}}
    return summary_row(ctx, result, trial_id=trial, error=False)


def _final(ctx: RowContext, task: str, label: str, method: str, seed: int, acc: float, params: int,
           ratio: float | None) -> dict:
    result = {"epoch": 2, "epochs": 2, "test_acc": acc, "trainable_params": params, "budget_ratio": ratio,
              "config": {"task": task, "method": method, "label": label, "seed": seed, "searched": label == "best",
                         "run_id": f"{task}/{label}/seed{seed}"}}
    return summary_row(ctx, result, trial_id=f"{label}-{seed}", error=False)


def _write(storage: Storage, sweep: str, search: list, final: list) -> None:
    writer = ResultsWriter(storage, sweep, flush_s=0.05)
    writer.start()
    search_ctx, final_ctx = (RowContext(sweep, phase, "mini", "spt-mini-vit", "h") for phase in ("search", "final"))
    for row in search:
        writer.put(_trial(search_ctx, *row))
    for row in final:
        writer.put(_final(final_ctx, *row))
    writer.close()


@pytest.fixture
def two_sweeps(tmp_path):
    storage = Storage.of(tmp_path)
    _write(storage, "a", SEARCH_A, FINAL_A)
    _write(storage, "b", SEARCH_B, FINAL_B)
    # what run_sweep does after the search phase: select on the sweep's results and persist
    driver = {s: persist_selection(storage, s, read_results(storage, s)) for s in ("a", "b")}
    return tmp_path, driver


def _front(rows: list) -> dict[str, list[str]]:
    """Brute force: completed searched trials not dominated in (val up, params down), by params."""
    cands = [r for r in rows if r[3] and r[6] == 2]
    out = {}
    for task in {r[1] for r in cands}:
        mine = [r for r in cands if r[1] == task]
        out[task] = [r[0] for r in sorted(mine, key=lambda r: r[5]) if not any(
            o[4] >= r[4] and o[5] <= r[5] and (o[4] > r[4] or o[5] < r[5]) for o in mine)]
    return out


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_reports_and_driver_agree_on_an_adversarial_table(two_sweeps, capsys, tmp_path_factory):
    root, driver = two_sweeps
    assert {t: r["trial_id"] for t, r in driver["a"].items()} == {"shapes": "s2", "count": "c1"}
    for cmd in ("best", "pareto", "final", "plot"):  # two sweeps and no --sweep: a one-line error naming both
        code, _, err = _cli(capsys, "results", cmd, "--storage", root)
        assert code == 2 and "a, b" in err and "--sweep" in err and len(err.strip().splitlines()) == 1, err

    code, out, _ = _cli(capsys, "results", "best", "--storage", root, "--sweep", "a", "--format", "json")
    best = {r["task"]: r for r in json.loads(out)}
    assert code == 0 and {t: r["trial_id"] for t, r in best.items()} == {"shapes": "s2", "count": "c1"}
    assert best["shapes"]["test_mean"] == pytest.approx(0.70) and best["shapes"]["seeds"] == 2  # sweep a only
    assert best["shapes"]["test_std"] == pytest.approx(math.sqrt(0.02))
    assert best["count"]["seeds"] == 0 and best["count"]["test_mean"] is None

    code, out, _ = _cli(capsys, "results", "pareto", "--storage", root, "--sweep", "a", "--format", "json")
    front = json.loads(out)
    assert code == 0 and {t: [r["trial_id"] for r in front if r["task"] == t] for t in ("shapes", "count")} \
        == _front(SEARCH_A)
    assert [r["trial_id"] for r in front if r["selected"]] == ["c1", "s2"]  # tasks in order

    code, out, _ = _cli(capsys, "results", "final", "--storage", root, "--sweep", "a", "--format", "json")
    final = {r["label"]: r for r in json.loads(out)}
    assert code == 0 and list(final) == ["best", "full", "lora"]
    assert final["lora"]["budget_ratio"] == pytest.approx(0.512) and final["lora"]["equal_budget"] is False
    assert final["best"]["equal_budget"] is True and final["full"]["budget_ratio"] is None
    assert final["full"]["equal_budget"] is None  # no budget applies: neither equal nor unequal

    out_dir = tmp_path_factory.mktemp("plots")
    code, out, _ = _cli(capsys, "results", "plot", "--storage", root, "--sweep", "a", "--out", out_dir)
    assert code == 0 and {p.name for p in out_dir.glob("*.png")} == {"pareto.png", "methods.png"}
    bars, what = method_bars(read_results(root, "a"), driver["a"])
    assert "test" in what and bars["shapes"]["SPT (selected)"][0] == pytest.approx(0.70)
    assert set(bars["shapes"]) == {"SPT (selected)", "full", "lora (x0.51 budget)"}  # never called equal

    code, out, _ = _cli(capsys, "results", "best", "--storage", root, "--sweep", "b", "--format", "json")
    assert [(r["trial_id"], r["test_mean"]) for r in json.loads(out)] == [("b1", pytest.approx(0.10))]


def test_one_sweep_needs_no_flag_and_an_unknown_one_is_named(tmp_path, capsys):
    storage = Storage.of(tmp_path)
    _write(storage, "only", SEARCH_A, [])
    code, out, err = _cli(capsys, "results", "best", "--storage", tmp_path, "--format", "json")
    assert code == 0 and "no saved selection" in err  # no persisted selection yet: said so
    assert {r["task"]: r["trial_id"] for r in json.loads(out)} == {"shapes": "s2", "count": "c1"}
    code, _, err = _cli(capsys, "results", "pareto", "--storage", tmp_path, "--sweep", "nope")
    assert code == 2 and "'nope'" in err and "only" in err


@pytest.mark.parametrize("sql", [
    "COPY (SELECT * FROM results) TO '{tmp}/leak.csv'",
    "ATTACH '{tmp}/leak.duckdb' AS leak",
    "EXPORT DATABASE '{tmp}/leak'",
    "INSTALL httpfs",
    "SELECT * FROM read_csv('{tmp}/a.txt')",
    "SET enable_external_access = true",
])
def test_query_is_read_only(two_sweeps, capsys, sql, tmp_path_factory):
    root, _ = two_sweeps
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "a.txt").write_text("x\n1\n")
    code, _, err = _cli(capsys, "results", "query", "--storage", root, "--sweep", "a", sql.format(tmp=elsewhere))
    assert code == 2 and "query failed" in err, err
    assert sorted(p.name for p in elsewhere.iterdir()) == ["a.txt"]
    code, out, _ = _cli(capsys, "results", "query", "--storage", root, "--sweep", "a", "--format", "csv",
                        "SELECT count(DISTINCT sweep) AS n, count(*) AS rows FROM results")
    assert code == 0 and out.split() == ["n,rows", f"1,{len(SEARCH_A) + len(FINAL_A)}"]


# ---- equal budgets --------------------------------------------------------------------------------
LORA_SETS = [("q", "v"), ("q", "k", "v"), ("q", "k", "v", "proj"), ("q", "k", "v", "proj", "fc1", "fc2")]
ADAPTER_SETS = [("fc2",)] + LORA_SETS


@pytest.fixture(scope="module")
def mini_layout() -> ModelLayout:
    return ModelLayout.from_model(build_embedded_vit(10))


def _brute(layout: ModelLayout, kind: str, sets: list, budget: int) -> list[tuple[float, int]]:
    """Every (targets, rank <= 64) candidate's |params / budget - 1| and params, from the formulas."""
    dims = [(t.name.split(".")[-2], t.d_in, t.d_out) for t in layout.matrices]
    out = []
    for targets in sets:
        for rank in range(1, 65):
            params = sum(rank * (i + o) if kind == "lora" else 2 * o * rank + rank + o
                         for name, i, o in dims if name in targets)
            out.append((abs(params / budget - 1), params))
    return out


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_uniform_baseline_lands_within_ten_percent_whenever_any_candidate_does(mini_layout, kind):
    sets = LORA_SETS if kind == "lora" else ADAPTER_SETS
    budgets = sorted({round(300 * 1.09 ** i) for i in range(50)})  # 300 .. 20k, the mini search range and beyond
    within = 0
    for budget in budgets:
        choice = match_uniform(mini_layout, budget, kind)
        brute = _brute(mini_layout, kind, sets, budget)
        assert abs(choice.params / budget - 1) == pytest.approx(min(d for d, _ in brute))  # the nearest
        assert choice.params in {p for _, p in brute}
        if any(d <= 0.10 for d, _ in brute):
            within += 1
            assert choice.equal and abs(choice.ratio - 1) <= 0.10, (budget, choice)
        else:
            assert not choice.equal
    assert 0 < within < len(budgets)  # both cases occur in this range


def test_final_phase_runs_equal_budget_baselines_with_exact_accounting(mini_layout):
    spec = SweepSpec.from_dict({"name": "e", "data_root": "/d", "storage": "/s", "tasks": ["shapes"],
                                "baselines": ["linear", "lora", "adapter"], "final_seeds": [42]})
    scores = torch.rand(sum(t.numel for t in mini_layout.scored), generator=torch.Generator().manual_seed(0))
    ranking = Ranking.from_scores(scores, mini_layout)
    for spt_params in (4500, 7000):  # cells had SPT 4.5k vs uniform LoRA 2.3k before
        best = {"shapes": {"trial_id": "t", "method": "spt-lora", "budget": spt_params, "alpha": 10.0, "rank": 8,
                           "lr": 1e-3, "weight_decay": 1e-4, "bits": None, "trainable_params": spt_params}}
        runs = {r["label"]: r for r in final_configs(spec, best, {"shapes": mini_layout})}
        assert runs["best"]["reference_params"] == spt_params and runs["linear"].get("reference_params") is None
        for label in ("lora", "adapter"):
            plan, source = build_trial_plan(runs[label], ranking, lambda: None)
            model = build_embedded_vit(10)
            apply_plan(model, plan)
            grad = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head"))
            assert source == "layout" and grad == plan.trainable_params
            assert sorted(plan.meta["targets"]) == sorted(runs[label]["targets"])
            assert abs(grad / spt_params - 1) <= 0.10, (label, spt_params, grad)
