"""Robust selection: each task's top candidates re-evaluated with more train800 -> val200 seeds, the choice by
their mean val accuracy over every run, and the pipeline running the re-evaluation between a task's search and
its selection (a plain PipelineSearcher with the driver's hooks replaced by recording functions, no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from spt_ray import SweepSpec
from spt_ray.pipeline import REEVAL, Hooks, PipelineSearcher, register_hooks
from spt_ray.results import SCHEMA
from spt_ray.search import PerTaskSearcher
from spt_ray.selection import reeval_configs, select_best
from spt_ray.space import SearchSpace
from spt_ray.suites import recipe

CANDIDATES = {"a": 0.80, "b": 0.78, "c": 0.76, "d": 0.75}  # single-run val accuracy of four searched trials
REEVALS = {"a": [0.70, 0.72], "b": [0.79, 0.80], "c": [0.75, 0.77]}  # the top 3 again with two seeds


def _row(trial: str, val: float, **kw) -> dict:
    return {"sweep": "sw", "task": "t", "phase": "search", "row_kind": "trial", "status": "completed",
            "searched": True, "trial_id": trial, "method": "spt-lora", "budget": 1000, "alpha": 10.0, "rank": 8,
            "lr": 1e-3, "weight_decay": 1e-4, "epoch": 2, "epochs": 2, "val_acc": val, "trainable_params": 1000,
            **kw}


def _table(with_reevals: bool) -> pa.Table:
    rows = [_row(t, v) for t, v in CANDIDATES.items()]
    if with_reevals:
        rows += [_row(f"{t}-r{i}", v, searched=False, label=f"reeval-{t}", seed=i + 1)
                 for t, vals in REEVALS.items() for i, v in enumerate(vals)]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def test_selection_by_the_mean_over_seeds_of_the_re_evaluated_top():
    assert select_best(_table(False))["t"]["trial_id"] == "a"  # one val200 run: the lucky one
    means = {t: (CANDIDATES[t] + sum(v)) / (1 + len(v)) for t, v in REEVALS.items()}  # a .74, b .79, c .76
    best = select_best(_table(True))["t"]
    assert best["trial_id"] == max(means, key=means.get) == "b"
    assert best["val_mean"] == pytest.approx(means["b"]) and best["val_runs"] == 3
    assert CANDIDATES["d"] > means["a"]  # d was not in the top 3: it never competes on a single run


def test_reeval_runs_are_the_top_candidates_with_each_seed():
    runs = reeval_configs(_table(False), "t", 3, (1, 2))
    assert [(r["label"], r["seed"]) for r in runs] == [(f"reeval-{t}", s) for t in "abc" for s in (1, 2)]
    assert all(not r["searched"] and r["method"] == "spt-lora" and r["lr"] == 1e-3 for r in runs)


def test_recipes_and_spec_checks():
    assert recipe("vtab")["reeval_top"] == recipe("fgvc")["reeval_top"] == 3 and "reeval_top" not in recipe("mini")
    base = dict(name="x", data_root="/d", storage="/s", tasks=["t"])
    with pytest.raises(ValueError, match="repeat the search seed 42"):
        SweepSpec.from_dict({**base, "reeval_top": 3, "reeval_seeds": [42, 1]})
    with pytest.raises(ValueError, match="reeval_top must be >= 0"):
        SweepSpec.from_dict({**base, "reeval_top": -1})
    assert SweepSpec.from_dict({**base, "reeval_top": 3, "reeval_seeds": [7, 8]}).reeval_seeds == (7, 8)


def test_the_pipeline_re_evaluates_between_a_search_and_its_selection():
    events: list[tuple] = []
    space = SearchSpace().resolve(700_000)
    register_hooks("sw", Hooks(
        space=lambda task: space,
        make_searcher=lambda task, sp: PerTaskSearcher({task: sp}, 2, seed=0),
        search_ended=lambda task, before: events.append(("selected", task)) or [],
        final_ended=lambda task: events.append(("final", task)),
        reeval_runs=lambda task: events.append(("reeval", task)) or [
            {"method": "spt-lora", "task": task, "seed": s, "searched": False, "label": "reeval-x"} for s in (1, 2)]))
    try:
        pipe = PipelineSearcher("sw", ["t"], run_final=False)
        search = [pipe.suggest(f"s{i}") for i in range(2)]
        for i in range(2):
            pipe.on_trial_complete(f"s{i}", {"val_acc": 0.5, "epoch": 1, "epochs": 1})
        assert all(c["phase"] == "search" and c["searched"] for c in search) and events == []
        again = [pipe.suggest(f"r{i}") for i in range(2)]
        assert events == [("reeval", "t")]
        assert [(c["phase"], c["label"], c["seed"]) for c in again] == [("search", "reeval-x", 1),
                                                                       ("search", "reeval-x", 2)]
        assert pipe.trials["r0"] == ("t", REEVAL) and pipe.suggest("z") is None  # waiting for the re-evaluation
        pipe.on_trial_complete("r0", {"val_acc": 0.6})
        assert pipe.suggest("z") is None and events == [("reeval", "t")]
        pipe.on_trial_complete("r1", {"val_acc": 0.6})
        assert pipe.suggest("z") == "FINISHED" and events == [("reeval", "t"), ("selected", "t")]
    finally:
        register_hooks("sw", None)


@pytest.mark.slow
def test_a_real_sweep_selects_by_the_re_evaluated_mean(ray_cluster, ray_mini_root, ray_backbone, tmp_path):
    from spt_ray import read_results, run_sweep
    from spt_ray.selection import read_selection
    from spt_ray.storage import Storage

    spec = SweepSpec.from_dict(dict(
        name="robust", data_root=ray_mini_root, storage=str(tmp_path), tasks=["count"], reeval_top=2,
        scheduler={"kind": "fifo"},
        reeval_seeds=[1], backbone=ray_backbone.to_dict(), num_samples=3, max_concurrent=2, final_seeds=[42],
        train={"epochs": 1, "batch_size": 32, "warmup_epochs": 0}, sensitivity={"num_batches": 2}))
    run_sweep(spec)
    trial_files = {p.name for p in (tmp_path / "tune").glob("*/*/*")}
    assert "result.json" in trial_files and "progress.csv" not in trial_files  # Tune's JSON logger only:
    assert not any(n.startswith("events.out.tfevents") for n in trial_files)  # no CSV, no tensorboard files
    rows = read_results(tmp_path, "robust").to_pylist()
    searched = {r["trial_id"]: r["val_acc"] for r in rows if r["row_kind"] == "trial" and r["searched"]}
    params = {r["trial_id"]: r["trainable_params"] for r in rows if r["row_kind"] == "trial" and r["searched"]}
    reeval = {r["label"].removeprefix("reeval-"): r["val_acc"] for r in rows
              if r["row_kind"] == "trial" and (r["label"] or "").startswith("reeval-")}
    # the documented order, written out: val_acc, then fewer trainable parameters, then the earlier trial id
    # (a 1-epoch run on 64 val images ties often)
    top2 = sorted(searched, key=lambda t: (-searched[t], params[t], t))[:2]
    assert sorted(reeval) == sorted(top2) and all(r["seed"] == 1 for r in rows if r["label"] in
                                                  {f"reeval-{t}" for t in top2})
    means = {t: (searched[t] + reeval[t]) / 2 for t in top2}
    chosen = read_selection(Storage.of(tmp_path), "robust")["count"]
    assert chosen["trial_id"] == min(means, key=lambda t: (-means[t], params[t], t)) and chosen["val_runs"] == 2
    final = [r for r in rows if r["row_kind"] == "final" and r["label"] == "best"]
    assert len(final) == 1 and final[0]["lr"] == pytest.approx(searched and chosen["lr"])
