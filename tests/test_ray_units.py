"""spt_ray pieces that need no cluster: spec validation, the search space, the per-task searcher and
scheduler (real OptunaSearch) and Parquet results (real files, read back with pyarrow and DuckDB). The
ranking the sensitivity store derives is tested in test_store_scale.py."""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import typing
from datetime import datetime, timezone
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spt_ray.driver import SELECTION_COLUMNS, pareto_front, select_best, summarize_final
from spt_ray.results import (FILE_SCHEMA, SCHEMA, ResultsWriter, RowContext, duckdb_connect, make_row, read_results,
                             summary_row)
from spt_ray.search import FixedSearcher, PerTaskScheduler, PerTaskSearcher
from spt_ray.space import SearchSpace
from spt_ray.spec import SweepSpec
from spt_ray.storage import Storage
BASE = dict(name="s", data_root="/data", storage="/store", tasks=["shapes"])


# ---- spec -----------------------------------------------------------------------------------------
def test_spec_from_dict_builds_nested_values():
    spec = SweepSpec.from_dict({**BASE, "tasks": "shapes,count", "backbone": "spt-mini-vit", "num_samples": 4,
                                "space": {"rank": [8], "alpha": [5, 20], "budget": {"low": 1e3, "high": 5e3},
                                          "budget_unit": "params"},
                                "resources": {"cpu": 0.5, "gpu": 0.25}, "train": {"epochs": 2, "batch_size": 32},
                                "final_train": {"epochs": 3}, "final_seeds": [42, 44], "baselines": ["linear"]})
    assert spec.tasks == ("shapes", "count") and spec.space.rank == (8,) and spec.space.alpha.high == 20
    assert spec.resources.gpu == 0.25 and spec.train.epochs == 2
    assert spec.final_recipe.epochs == 3 and spec.final_recipe.batch_size == 32  # final inherits train
    assert spec.search_samples == 2 * (4 + 1)
    again = SweepSpec.from_dict(spec.to_dict())
    assert again.to_dict() == spec.to_dict()


def test_spec_from_yaml(tmp_path):
    (tmp_path / "sweep.yaml").write_text("name: y\ndata_root: /d\nstorage: /s\ntasks: [shapes, count]\n"
                                         "multi_objective: true\nscheduler: {grace_period: 2}\n")
    spec = SweepSpec.from_yaml(tmp_path / "sweep.yaml")
    assert spec.tasks == ("shapes", "count") and spec.multi_objective and spec.scheduler.grace_period == 2
    (tmp_path / "bad.yaml").write_text("name: y\ndata_root: /d\nstorage: /s\ntasks: [a]\nschedular: {}\n")
    with pytest.raises(ValueError, match="did you mean 'scheduler'"):
        SweepSpec.from_yaml(tmp_path / "bad.yaml")


@pytest.mark.parametrize("bad, match", [
    ({"num_sample": 3}, "did you mean 'num_samples'"),
    ({"space": {"ranks": [4]}}, "search space: unknown key"),
    ({"train": {"epoch": 2}}, "sweep spec `train`: unknown key"),
    ({"resources": {"cpu": 0}}, "cpu > 0"),
    ({"name": "a/b"}, "sweep name"),
    ({"baselines": ["spt-lora"]}, "unknown baselines"),
    ({"space": {"methods": ["lora"]}}, "baselines"),
    ({"space": {"alpha": [0, 3]}}, "0 < low"),
])
def test_spec_rejects_bad_input_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        SweepSpec.from_dict({**BASE, **bad})


def test_spec_requires_the_essentials():
    with pytest.raises(ValueError, match="missing required"):
        SweepSpec.from_dict({"name": "s", "tasks": ["shapes"]})


def test_space_resolves_fractional_budgets_and_corners():
    space = SearchSpace.from_dict({"rank": [4, 16]})
    resolved = space.resolve(1_000_000)
    assert (resolved.budget_low, resolved.budget_high) == (500, 12_000)
    corners = resolved.corners(alpha_points=3)
    assert len(corners) == 2 * 2 * 3 and {c["budget"] for c in corners} == {12_000}
    assert {c["structured"] for c in corners} == {"lora", "adapter"}
    with pytest.raises(ValueError, match="exceeds"):
        SearchSpace.from_dict({"budget": [10, 2e6], "budget_unit": "params"}).resolve(1_000_000)


# ---- the per-task searcher and scheduler ----------------------------------------------------------
def _searcher(tasks=("a", "b"), n=3, **kw) -> PerTaskSearcher:
    spaces = {t: SearchSpace().resolve(700_000) for t in tasks}
    return PerTaskSearcher(spaces, n, seed=7, **kw)


def test_searcher_round_robin_fixed_first_and_finishes():
    s = _searcher(fixed=[{"method": "linear", "lr": 1e-3, "weight_decay": 1e-4}])
    configs = [s.suggest(f"t{i}") for i in range(9)]
    assert [c["method"] for c in configs[:2]] == ["linear", "linear"] and not configs[0]["searched"]
    assert [c["task"] for c in configs[2:8]] == ["a", "b", "a", "b", "a", "b"]
    assert all(c["method"] in ("spt-lora", "spt-adapter") and 350 <= c["budget"] <= 8400 for c in configs[2:8])
    assert configs[8] == "FINISHED"


def test_searcher_is_seeded_per_task():
    one, two = _searcher(tasks=("a", "b")), _searcher(tasks=("b", "a", "c"))
    a1 = [c for c in (one.suggest(f"x{i}") for i in range(6)) if c["task"] == "a"]
    a2 = [c for c in (two.suggest(f"y{i}") for i in range(9)) if c["task"] == "a"]
    assert a1 == a2  # adding or reordering tasks does not change a task's suggestions


def test_searcher_routes_results_and_prunes_stopped_trials():
    s = _searcher(n=2)
    ids = ["t0", "t1", "t2", "t3"]
    cfg = {i: s.suggest(i) for i in ids}
    for step in (1, 2):
        for i in ids:
            s.on_trial_result(i, {"val_acc": 0.1 * step, "epoch": step, "epochs": 3, "training_iteration": step})
    s.on_trial_complete("t0", {"val_acc": 0.5, "epoch": 3, "epochs": 3})  # ran to the end
    s.on_trial_complete("t1", {"val_acc": 0.2, "epoch": 2, "epochs": 3})  # stopped early by ASHA
    s.on_trial_complete("t2", None, error=True)
    s.on_trial_complete("t3", {"val_acc": 0.3, "epoch": 3, "epochs": 3})
    assert cfg["t0"]["task"] == cfg["t2"]["task"] == "a"
    assert s.trial_states("a") == {"COMPLETE": 1, "FAIL": 1}
    assert s.trial_states("b") == {"PRUNED": 1, "COMPLETE": 1}
    pruned = [t for t in s.study("b").trials if t.state.name == "PRUNED"][0]
    assert pruned.value == pytest.approx(0.2) and pruned.intermediate_values == {1: 0.1, 2: 0.2}


def test_searcher_state_survives_save_and_restore(tmp_path):
    s = _searcher(n=3)
    for i in range(3):
        s.suggest(f"t{i}")
    s.on_trial_complete("t0", {"val_acc": 0.4, "epoch": 1, "epochs": 1})
    s.save(str(tmp_path / "state.pkl"))
    fresh = _searcher(n=3)
    fresh.restore(str(tmp_path / "state.pkl"))
    assert fresh.remaining == s.remaining and fresh.trial_task == s.trial_task
    assert fresh.trial_states("a") == {"COMPLETE": 1, "RUNNING": 1}
    fresh.on_trial_complete("t2", {"val_acc": 0.1, "epoch": 1, "epochs": 1})  # a trial suggested before saving
    assert fresh.trial_states("a") == {"COMPLETE": 2}
    nxt = [fresh.suggest(f"u{i}") for i in range(4)]
    assert [c["task"] if isinstance(c, dict) else c for c in nxt] == ["b", "a", "b", "FINISHED"]
    pickle.loads(pickle.dumps(fresh))  # Tuner pickles it with the experiment


def test_a_failed_trial_completed_on_resume_is_complete_in_its_study(tmp_path):
    """Tune tells an errored trial FAIL; `--resume` reruns it from its checkpoint (a restored searcher) and it
    completes: its study must then say COMPLETE with every epoch's value, as Parquet says completed."""
    s = _searcher(tasks=("a",), n=2)
    s.suggest("t0"), s.suggest("t1")
    s.on_trial_result("t0", {"val_acc": 0.3, "epoch": 1, "epochs": 3, "training_iteration": 1})
    s.on_trial_complete("t0", None, error=True)
    s.on_trial_complete("t1", {"val_acc": 0.4, "epoch": 3, "epochs": 3})
    assert s.trial_states("a") == {"FAIL": 1, "COMPLETE": 1}
    s.save(str(tmp_path / "state.pkl"))
    resumed = _searcher(tasks=("a",), n=2)
    resumed.restore(str(tmp_path / "state.pkl"))
    for epoch, val in ((2, 0.5), (3, 0.6)):
        resumed.on_trial_result("t0", {"val_acc": val, "epoch": epoch, "epochs": 3, "training_iteration": epoch})
    resumed.on_trial_complete("t0", {"val_acc": 0.6, "epoch": 3, "epochs": 3})
    assert resumed.trial_states("a") == {"COMPLETE": 2}
    first = resumed.study("a").trials[0]
    assert first.value == pytest.approx(0.6) and first.intermediate_values == {1: 0.3, 2: 0.5, 3: 0.6}
    assert resumed.study("a").best_trial.number == 0 and resumed.told == {"t0": "COMPLETE", "t1": "COMPLETE"}
    assert [t.params for t in resumed.study("a").trials] == [t.params for t in s.study("a").trials]


def test_multi_objective_searcher_completes_with_both_values():
    s = _searcher(tasks=("a",), n=2, multi_objective=True)
    s.suggest("t0")
    s.on_trial_result("t0", {"val_acc": 0.1, "epoch": 1, "epochs": 1, "training_iteration": 1})  # ignored
    s.on_trial_complete("t0", {"val_acc": 0.3, "storage_bytes": 1234, "epoch": 1, "epochs": 1})
    t = s.study("a").trials[0]
    assert t.state.name == "COMPLETE" and t.values == [0.3, 1234]  # (val_acc, storage bytes of the delta)
    assert type(s.study("a").sampler).__name__ == "TPESampler"


def test_fixed_searcher_resumes_where_it_stopped(tmp_path):
    s = FixedSearcher([{"run_id": str(i)} for i in range(3)])
    assert s.suggest("a")["run_id"] == "0"
    s.save(str(tmp_path / "f.pkl"))
    again = FixedSearcher([])
    again.restore(str(tmp_path / "f.pkl"))
    assert [again.suggest(x) for x in "bcd"] == [{"run_id": "1"}, {"run_id": "2"}, "FINISHED"]


def test_scheduler_keeps_one_asha_per_task_and_spares_fixed_trials():
    sched = PerTaskScheduler(max_t=4, grace_period=1, reduction_factor=2)
    trials = [SimpleNamespace(trial_id=f"{task}{i}", config={"task": task, "searched": True})
              for task in ("easy", "hard") for i in range(3)]
    fixed = SimpleNamespace(trial_id="base", config={"task": "hard", "searched": False})
    for t in [*trials, fixed]:
        sched.on_trial_add(None, t)
    acc = {"easy": [0.9, 0.8, 0.7], "hard": [0.3, 0.2, 0.1]}
    decisions = {}
    for t in trials:
        i = int(t.trial_id[-1])
        decisions[t.trial_id] = sched.on_trial_result(None, t, {"epoch": 1, "val_acc": acc[t.config["task"]][i]})
    assert decisions["hard0"] == "CONTINUE"  # a global ASHA would stop the hard task's best trial
    assert decisions["easy2"] == "STOP" and decisions["hard2"] == "STOP"
    assert sched.on_trial_result(None, fixed, {"epoch": 1, "val_acc": 0.0}) == "CONTINUE"
    assert set(sched.per_task) == {"easy", "hard"}


# ---- results ------------------------------------------------------------------------------------
CTX = RowContext("sw", "search", "mini", "spt-mini-vit", "abc", (("shapes", "k1"), ("count", "k2")))


def _result(task: str, trial: str, epoch: int, epochs: int = 2, val: float = 0.5, **extra) -> dict:
    return {"trial_id": trial, "training_iteration": epoch, "epoch": epoch, "epochs": epochs, "val_acc": val,
            "val_loss": 1.0, "train_loss": 1.2, "trainable_params": 1000 + epoch, "storage_bytes": 4000,
            "train_s": 1.0, "eval_s": 0.5, "wall_s": 2.0, "train_s_total": 2.0, "eval_s_total": 1.0,
            "setup_s_total": 0.3, "wall_s_total": 4.0, "host": "h", "torch_version": torch.__version__,
            "config": {"task": task, "method": "spt-lora", "budget": 1000, "alpha": 10.0, "rank": 8, "lr": 1e-3,
                       "weight_decay": 1e-4, "bits": None, "searched": True}, **extra}


def test_rows_are_typed_and_summaries_carry_totals():
    row = summary_row(CTX, _result("shapes", "t1", 2, test_acc=0.9), trial_id="t1", error=False)
    assert row["status"] == "completed" and row["row_kind"] == "trial"
    assert row["train_s"] == 2.0 and row["wall_s"] == 4.0 and row["sensitivity_key"] == "k1"
    assert row["test_acc"] is None  # search rows never carry test numbers
    table = pa.Table.from_pylist([row], schema=FILE_SCHEMA)
    assert table.schema.field("budget").type == pa.int64() and table.column("rank")[0].as_py() == 8
    stopped = summary_row(CTX, _result("shapes", "t2", 1), trial_id="t2", error=False)
    assert stopped["status"] == "stopped"


def test_writer_streams_atomic_files_and_never_duplicates(tmp_path):
    storage = Storage.of(tmp_path)
    writer = ResultsWriter(storage, "sw", flush_s=0.2)
    writer.start()
    for task, trial in (("shapes", "t1"), ("count", "t2")):
        for epoch in (1, 2):
            writer.put(make_row(CTX, _result(task, trial, epoch), row_kind="report", status="running"))
    writer.flush()
    files = sorted((tmp_path / "results" / "sweep=sw").rglob("*.parquet"))
    assert len(files) == 1 and files[0].parent.name == "sweep=sw"  # one file per flush, every task's rows
    assert not [f for f in (tmp_path / "results").rglob("*") if f.name.endswith(".tmp")]
    assert pq.read_schema(files[0]).equals(SCHEMA)
    # the same rows again (a resumed driver, a reconciliation): nothing new is written
    again = ResultsWriter(storage, "sw", flush_s=0.2)
    again.start()
    for epoch in (1, 2, 3):
        again.put(make_row(CTX, _result("shapes", "t1", epoch, epochs=3), row_kind="report", status="running"))
    again.flush()
    again.close()
    writer.close()
    assert again.rows_skipped == 2 and again.rows_written == 1
    table = read_results(storage, "sw")
    assert table.schema.equals(SCHEMA) and table.num_rows == 5
    assert sorted(table.column("task").to_pylist()) == ["count"] * 2 + ["shapes"] * 3


def test_readers_dedup_duplicate_files_pyarrow_and_duckdb(tmp_path):
    storage = Storage.of(tmp_path)
    rows = [make_row(CTX, _result("shapes", "t1", e), row_kind="report", status="running") for e in (1, 2)]
    later = [{**r, "created_at": datetime(2100, 1, 1, tzinfo=timezone.utc), "val_acc": 0.0} for r in rows]
    d = tmp_path / "results" / "sweep=sw" / "task=shapes"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=FILE_SCHEMA), d / "part-a.parquet")
    pq.write_table(pa.Table.from_pylist(later, schema=FILE_SCHEMA), d / "part-b.parquet")  # e.g. two drivers
    table = read_results(storage, "sw")
    assert table.num_rows == 2 and table.column("val_acc").to_pylist() == [0.5, 0.5]  # first written wins
    assert read_results(storage, "sw", dedup=False).num_rows == 4
    con = duckdb_connect(storage)
    assert con.execute("SELECT count(*), count(DISTINCT row_id), max(val_acc) FROM results").fetchone() == (2, 2, 0.5)
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE results)").fetchall())
    assert types["budget"] == "BIGINT" and types["created_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["sweep"] == "VARCHAR" and types["task"] == "VARCHAR"
    assert list(types) == list(SCHEMA.names)


def test_results_through_a_pyarrow_uri(tmp_path):
    storage = Storage.of(f"file://{tmp_path}")
    assert not storage.local
    writer = ResultsWriter(storage, "sw", flush_s=0.1)
    writer.start()
    writer.put(make_row(CTX, _result("count", "t9", 1), row_kind="report", status="running"))
    writer.close()
    assert read_results(storage, "sw").num_rows == 1
    assert duckdb_connect(storage).execute("SELECT count(*) FROM results").fetchone() == (1,)


def test_selection_reads_validation_only_and_summaries():
    assert not any("test" in c for c in SELECTION_COLUMNS)
    rows = []
    for trial, val, params, status in (("a", 0.5, 900, "completed"), ("b", 0.7, 2000, "completed"),
                                       ("c", 0.7, 1500, "completed"), ("d", 0.9, 100, "stopped")):
        r = summary_row(CTX, _result("shapes", trial, 2 if status == "completed" else 1, val=val), trial_id=trial,
                        error=False)
        rows.append({**r, "trainable_params": params, "sweep": "sw"})
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    table = table.set_column(table.schema.get_field_index("test_acc"), "test_acc",
                             pa.array([1.0, 0.0, 0.0, 1.0]))  # a test column that must not matter
    best = select_best(table)
    assert best["shapes"]["trial_id"] == "c"  # highest val_acc among completed, then fewer parameters
    assert "test_acc" not in best["shapes"]
    assert [r["trial_id"] for r in pareto_front(table)["shapes"]] == ["a", "c"]
    finals = [{**make_row(RowContext("sw", "final", "mini", "b", "h"), _result("shapes", f"f{s}", 2), row_kind="final",
                          status="completed"), "label": "best", "seed": s, "test_acc": acc, "sweep": "sw"}
              for s, acc in ((42, 0.5), (44, 0.7))]
    summary = summarize_final(pa.Table.from_pylist(finals, schema=SCHEMA))
    assert summary["shapes"]["best"]["mean"] == pytest.approx(0.6) and summary["shapes"]["best"]["n"] == 2
    assert summary["shapes"]["best"]["std"] == pytest.approx(0.1414, abs=1e-3)


# ---- module hygiene -------------------------------------------------------------------------------
def test_plots_do_not_import_the_report():
    """One direction only: the report imports the plots, never the reverse."""
    code = "import sys, spt_ray.plots; print('spt_ray.report' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_cli_command_function_is_reachable():
    from spt_ray import cli

    parser, funcs, todo = cli.build_parser(), set(), []
    todo.append(parser)
    while todo:
        p = todo.pop()
        funcs.add(p.get_default("func"))
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    defined = {f for name, f in vars(cli).items() if name.startswith("cmd_") and callable(f)}
    assert defined <= funcs, sorted(f.__name__ for f in defined - funcs)


def test_trainable_annotations_name_real_types():
    from spt_ray import trainable

    for name in ("build_trial_plan", "fetch_ranking", "spt_trainable", "make_trainable", "count_start"):
        typing.get_type_hints(getattr(trainable, name))  # NameError on an undefined type
