"""Persistent, warm-started Optuna studies of PerTaskSearcher (spt_ray/search.py, spt_ray/studies.py): what a
study holds is read back with plain `optuna.load_study` on the sweep's journal / RDB URL, never through the
searcher, and compared with what was told (and, for a real sweep, with the Parquet rows)."""

from __future__ import annotations

import pickle

import optuna
import pytest

from spt_ray.search import PerTaskSearcher
from spt_ray.space import SearchSpace
from spt_ray.studies import study_store
from tests.searched_sweep import TASKS, TRIALS_PER_TASK

VIT_B16 = 85_798_656


def _complete(s: PerTaskSearcher, trial_id: str, val: float) -> None:
    s.on_trial_complete(trial_id, {"val_acc": val, "storage_bytes": 1000, "epoch": 1, "epochs": 1})


def _searcher(store, n=3, tasks=("a", "b"), sweep="sw", **kw) -> PerTaskSearcher:
    spaces = {t: SearchSpace().resolve(700_000) for t in tasks}
    return PerTaskSearcher(spaces, n, seed=5, store=store, sweep=sweep, **kw)


def _stored(target: str, name: str) -> list[tuple[str, float | None, dict]]:
    study = optuna.load_study(study_name=name, storage=target if "://" in target else
                              optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(target)))
    return [(t.state.name, t.value, t.params) for t in study.trials]


@pytest.mark.parametrize("backend", ["journal", "sqlite"])
def test_every_task_study_is_stored_with_what_was_told(tmp_path, backend):
    url = f"sqlite:///{tmp_path / 'studies.db'}" if backend == "sqlite" else None
    store = study_store(str(tmp_path), "sw", url)
    assert store.target == (url or str(tmp_path / "optuna" / "sw.journal"))
    s = _searcher(store)
    configs = {f"t{i}": s.suggest(f"t{i}") for i in range(6)}
    for i, tid in enumerate(configs):
        _complete(s, tid, 0.1 * i)
    for task in ("a", "b"):
        told = [(0.1 * i, {k: v for k, v in c.items() if k not in ("task", "searched", "bits")})
                for i, (tid, c) in enumerate(configs.items()) if c["task"] == task]
        stored = _stored(store.target, f"sw/{task}")
        assert [st for st, _, _ in stored] == ["COMPLETE"] * 3
        assert [(pytest.approx(v), p) for _, v, p in stored] == [(pytest.approx(v), p) for v, p in told]


@pytest.mark.parametrize("how", ["restore", "unpickle"])
def test_restore_drops_trials_after_the_checkpoint_and_reopens_running_ones(tmp_path, how):
    """Tune restores the searcher as it was at its last experiment checkpoint (through `restore`, or
    unpickled inside the pipeline's searcher): trials the store holds from after it are dropped (Tune
    suggests them again), a trial Tune still runs is RUNNING again, an enqueued warm start asked after it
    goes back to the queue; no trial is ever held twice."""
    store = study_store(str(tmp_path), "sw")
    s = _searcher(store, n=8, tasks=("a",))  # 8 trials: 2 paper warm starts (a quarter), then TPE
    first = [s.suggest(f"t{i}") for i in range(2)]
    assert [c["method"] for c in first] == ["spt-lora", "spt-adapter"]  # the enqueued paper configurations
    _complete(s, "t0", 0.5)
    s.save(str(tmp_path / "ckpt.pkl"))  # Tune's experiment checkpoint
    snapshot = pickle.dumps({"searchers": {"a": s}})
    _complete(s, "t1", 0.6)  # after the checkpoint: finished, and a new trial started
    s.suggest("t2")
    assert [st for st, _, _ in _stored(store.target, "sw/a")] == ["COMPLETE", "COMPLETE", "RUNNING"]

    if how == "restore":
        restored = _searcher(store, n=8, tasks=("a",))
        restored.restore(str(tmp_path / "ckpt.pkl"))
    else:
        restored = pickle.loads(snapshot)["searchers"]["a"]
    stored = _stored(store.target, "sw/a")
    assert [st for st, _, _ in stored] == ["COMPLETE", "RUNNING"]
    assert stored[1][2]["method"] == first[1]["method"] == "spt-adapter"
    _complete(restored, "t1", 0.65)  # Tune resumes t1 from its checkpoint
    again = [restored.suggest(f"u{i}") for i in range(7)]
    assert again[6] == "FINISHED"
    for i in range(6):
        _complete(restored, f"u{i}", 0.2 + i / 100)
    stored = _stored(store.target, "sw/a")
    assert [st for st, _, _ in stored] == ["COMPLETE"] * 8
    assert [v for _, v, _ in stored] == pytest.approx([0.5, 0.65] + [0.2 + i / 100 for i in range(6)])


def test_a_stale_study_of_this_sweep_is_replaced_and_another_sweeps_refused(tmp_path):
    store = study_store(str(tmp_path), "sw")
    s = _searcher(store, tasks=("a",))
    s.suggest("t0")  # a run killed before Tune saved anything: a fresh searcher starts the study over
    again = _searcher(store, tasks=("a",))
    again.suggest("x0")
    assert [st for st, _, _ in _stored(store.target, "sw/a")] == ["RUNNING"]
    other = study_store(str(tmp_path / "elsewhere"), "sw", store.target)  # same journal, another sweep's storage
    with pytest.raises(ValueError, match="another sweep.*--name"):
        _searcher(other, tasks=("a",)).suggest("y0")


def test_memory_studies_stay_in_memory(tmp_path):
    s = _searcher(study_store(str(tmp_path), "sw", "memory"), tasks=("a",))
    s.suggest("t0")
    assert isinstance(s.study("a")._storage, optuna.storages.InMemoryStorage)
    assert not (tmp_path / "optuna").exists()


# ---- warm starts ------------------------------------------------------------------------------------
def test_paper_configurations_come_first_scaled_and_clipped():
    vtab = SearchSpace.from_dict({"budget": [5e4, 1e6], "budget_unit": "params", "rank": [4, 8, 16],
                                  "lr": [1e-4, 1e-2]}).resolve(VIT_B16)
    s = PerTaskSearcher({"cifar": vtab}, 24, seed=0)
    got = [s.suggest(f"t{i}") for i in range(5)]
    paper = [(m, b) for b in (400_000, 1_000_000) for m in ("spt-lora", "spt-adapter")]
    assert [(c["method"], c["budget"]) for c in got[:4]] == paper
    assert all((c["alpha"], c["rank"], c["lr"], c["weight_decay"]) == (10.0, 8, 1e-3, 1e-4) for c in got[:4])
    assert got[4]["alpha"] != 10.0  # then the sampler's own points
    # the mini backbone: 0.4M / 85.8M of its parameters, clipped into the mini space (lr >= 2e-3, budget >= 0.5%)
    mini = SearchSpace.from_dict({"budget": [0.005, 0.03], "rank": [4, 8], "lr": [2e-3, 1e-2]}).resolve(2_000_000)
    points = mini.warm_starts()
    assert round(0.4e6 / VIT_B16 * 2_000_000) < 10_000  # below the space: clipped to its low end
    assert [p["budget"] for p in points] == [10_000, 10_000] + [round(1e6 / VIT_B16 * 2_000_000)] * 2
    assert {p["lr"] for p in points} == {2e-3} and {p["rank"] for p in points} == {8}
    assert len(mini.warm_starts(limit=1)) == 1
    searched = SearchSpace.from_dict({"bits": [2, None, 1]}).resolve(700_000)
    assert all(p["bits"] is None for p in searched.warm_starts())  # the paper trains float weights


def test_warm_start_from_another_sweeps_studies(tmp_path):
    first = _searcher(study_store(str(tmp_path), "one"), tasks=("a",), sweep="one", paper_warm_start=False)
    for i in range(3):
        first.suggest(f"t{i}")
        _complete(first, f"t{i}", 0.3 + i / 10)
    second = _searcher(study_store(str(tmp_path), "two"), tasks=("a",), sweep="two", warm_start_from="one")
    second.suggest("u0")
    trials = second.study("a").trials
    assert [t.value for t in trials[:3]] == pytest.approx([0.3, 0.4, 0.5])
    assert [t.params for t in trials[:3]] == [t.params for t in first.study("a").trials]
    assert trials[3].params["method"] == "spt-lora" and trials[3].params["alpha"] == 10.0  # then the paper's
    narrow = PerTaskSearcher({"a": SearchSpace.from_dict({"lr": [1e-3, 2e-3]}).resolve(700_000)}, 3,
                             store=study_store(str(tmp_path), "three"), sweep="three", warm_start_from="one")
    with pytest.raises(ValueError, match="same space"):
        narrow.suggest("v0")
    with pytest.raises(ValueError, match="no Optuna study 'nope/a'"):
        _searcher(study_store(str(tmp_path), "four"), tasks=("a",), sweep="four", warm_start_from="nope").suggest("w")


def test_searched_bits_are_sampled_and_baselines_stay_float():
    space = SearchSpace.from_dict({"bits": ["float", 2, 1]})
    assert space.searched_bits == (None, 2, 1) and space.fixed_bits is None
    assert SearchSpace.from_dict({"bits": 2}).fixed_bits == 2 and not SearchSpace.from_dict({"bits": 2}).searched_bits
    s = PerTaskSearcher({"a": space.resolve(700_000)}, 30, seed=1, paper_warm_start=False)
    bits = [s.suggest(f"t{i}")["bits"] for i in range(30)]
    assert set(bits) == {None, 2, 1}
    with pytest.raises(ValueError, match="bits must be"):
        SearchSpace.from_dict({"bits": [2, 2]})
    with pytest.raises(ValueError, match="bits must be"):
        SearchSpace.from_dict({"bits": [4]})


# ---- a real sweep -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_real_sweeps_studies_equal_its_parquet_rows(searched_sweep):
    """The session's search-only sweep (tests/searched_sweep.py): each task's study in its default journal."""
    from spt_ray import read_results

    root, name = searched_sweep.storage, searched_sweep.name
    rows = {r["trial_id"]: r for r in read_results(root, name).to_pylist() if r["row_kind"] == "trial"}
    journal = root / "optuna" / f"{name}.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    for task in TASKS:
        study = optuna.load_study(study_name=f"{name}/{task}", storage=storage)
        assert len(study.trials) == TRIALS_PER_TASK and all(t.state.name == "COMPLETE" for t in study.trials)
        for t in study.trials:
            row = rows[t.user_attrs["tune_trial_id"]]
            assert (row["task"], row["status"]) == (task, "completed")
            assert t.value == pytest.approx(row["val_acc"])
            assert {k: row[k] for k in t.params} == pytest.approx(t.params)
        first = study.trials[0].params  # the paper's SPT-LoRA configuration, clipped to the mini space
        assert (first["method"], first["alpha"], first["rank"]) == ("spt-lora", 10.0, 8)
