"""The whole Pareto front gets test numbers (multi-objective mode): the front over (val_acc, storage bytes of
the task delta), every point of it retrained by the final phase with the final seeds, and the report and the
plot carrying val and test for each point."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pytest

from spt_ray.results import SCHEMA
from spt_ray.selection import final_configs, front_label, front_with_test, pareto_front, summarize_final

# (trial, val_acc, trainable_params, storage_bytes, bits): "q" has more parameters than "p" but 1-bit weights
TRIALS = [("p", 0.70, 1000, 4000, None), ("q", 0.69, 3000, 900, 1), ("r", 0.80, 5000, 20000, None),
          ("s", 0.60, 2000, 8000, None), ("t", 0.80, 6000, 24000, None)]


def _table(extra: list[dict] | None = None) -> pa.Table:
    rows = [{"sweep": "sw", "task": "a", "phase": "search", "row_kind": "trial", "status": "completed",
             "searched": True, "trial_id": tid, "method": "spt-lora", "budget": params, "alpha": 10.0, "rank": 8,
             "lr": 1e-3, "weight_decay": 1e-4, "bits": bits, "epoch": 1, "epochs": 1, "val_acc": val,
             "trainable_params": params, "storage_bytes": nbytes} for tid, val, params, nbytes, bits in TRIALS]
    return pa.Table.from_pylist(rows + (extra or []), schema=SCHEMA)


def brute_front(points: list[tuple], cost: int) -> list[str]:
    """Non-dominated (max val, min cost) by definition, over every pair."""
    return sorted(p[0] for p in points if not any(
        o[1] >= p[1] and o[cost] <= p[cost] and (o[1] > p[1] or o[cost] < p[cost]) for o in points))


def test_the_front_follows_the_modes_cost():
    table = _table()
    by_params = [r["trial_id"] for r in pareto_front(table)["a"]]
    by_bytes = [r["trial_id"] for r in pareto_front(table, "storage_bytes")["a"]]
    assert sorted(by_params) == brute_front(TRIALS, 2) == ["p", "r"]
    assert sorted(by_bytes) == brute_front(TRIALS, 3) == ["p", "q", "r"]  # the 1-bit point joins on bytes
    with pytest.raises(ValueError, match="cost"):
        pareto_front(table, "test_acc")


def test_the_final_phase_covers_the_whole_front_with_every_seed():
    table = _table()
    fronts = pareto_front(table, "storage_bytes")
    best = {"a": next(r for r in fronts["a"] if r["trial_id"] == "r")}
    spec = SimpleNamespace(baselines=("linear",), final_seeds=(42, 44), tasks=("a",), space=SimpleNamespace(
        fixed_bits=None), final_recipe=SimpleNamespace(lr=1e-3, weight_decay=1e-4))
    runs = final_configs(spec, best, {}, fronts)
    covered = {(r["source_trial"], r["seed"]) for r in runs if r["searched"]}
    assert covered == {(t, s) for t in ("p", "q", "r") for s in (42, 44)}
    q = [r for r in runs if r["source_trial"] == "q"]
    assert {r["label"] for r in q} == {front_label("q")} and all(r["bits"] == 1 for r in q)
    assert {r["label"] for r in runs} == {"best", front_label("p"), front_label("q"), "linear"}
    assert len(runs) == 4 * 2 and not final_configs(spec, best, {}, None)[0]["label"].startswith("front")

    finals = [{"sweep": "sw", "task": "a", "phase": "final", "row_kind": "final", "status": "completed",
               "label": r["label"], "method": r["method"], "seed": r["seed"], "trainable_params": 1,
               "test_acc": 0.5 + 0.1 * (r["source_trial"] == "q") + 0.01 * (r["seed"] == 44)} for r in runs]
    rows = front_with_test(fronts, summarize_final(_table(finals)), best)["a"]
    assert [(r["trial_id"], r["selected"], r["seeds"]) for r in rows] == [("q", False, 2), ("p", False, 2),
                                                                            ("r", True, 2)]
    assert [r["test_mean"] for r in rows] == pytest.approx([0.605, 0.505, 0.505])


@pytest.mark.slow
def test_a_multi_objective_sweep_retrains_its_whole_front(ray_cluster, ray_mini_root, ray_backbone, tmp_path, capsys):
    """A real sweep: (val_acc, storage bytes) with searched bits; every front point of every task has its final
    run, and `spt-ray results pareto` shows val and test for each."""
    from spt_ray import SweepSpec, read_results, run_sweep
    from spt_ray.cli import main

    spec = SweepSpec.from_dict(dict(
        name="front", data_root=ray_mini_root, storage=str(tmp_path), tasks=["shapes", "count"],
        backbone=ray_backbone.to_dict(), num_samples=4, max_concurrent=2, final_seeds=[42], seed=2,
        multi_objective=True, space={"bits": [None, 2, 1]}, sensitivity={"num_batches": 2},
        train={"epochs": 1, "batch_size": 32, "warmup_epochs": 0}))
    result = run_sweep(spec)
    table = read_results(tmp_path, "front")
    fronts = pareto_front(table, "storage_bytes")
    finals = {(r["task"], r["label"]) for r in table.to_pylist() if r["row_kind"] == "final" and
              r["status"] == "completed" and r["test_acc"] is not None}
    for task, front in fronts.items():
        for r in front:
            label = "best" if r["trial_id"] == result.best[task]["trial_id"] else front_label(r["trial_id"])
            assert (task, label) in finals, (task, label, sorted(finals))
    assert {r["trial_id"] for f in result.pareto.values() for r in f} == {r["trial_id"] for f in fronts.values()
                                                                          for r in f}
    capsys.readouterr()
    assert main(["results", "pareto", "--storage", str(tmp_path), "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown) == sum(len(f) for f in fronts.values())
    assert all(r["test_mean"] is not None and r["val_acc"] is not None and r["storage_bytes"] for r in shown)
