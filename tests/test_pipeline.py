"""Per-task pipelining (spt_ray/pipeline.py) without a cluster: real PerTaskSearchers and Optuna studies, the
driver's hooks as plain functions. A task's search starts when its own ranking is ready, its final runs when
its own search has ended, while another task is still searching; selection sees only ended searches."""

from __future__ import annotations

import pickle

from ray.tune.search import Searcher

from spt_ray.pipeline import FINAL, SEARCH, Hooks, PipelineSearcher, register_hooks
from spt_ray.search import PerTaskSearcher
from spt_ray.space import SearchSpace

SPACE = SearchSpace().resolve(700_000)


class Driver:
    """The driver's side, recorded: which rankings are ready, which searches ended, in which order."""

    def __init__(self, ready: set[str]):
        self.ready, self.events = set(ready), []

    def hooks(self) -> Hooks:
        return Hooks(space=lambda t: SPACE if t in self.ready else None,
                     make_searcher=lambda t, s: PerTaskSearcher({t: s}, 2, seed=0, fixed=[{"method": "linear"}]),
                     search_ended=self.search_ended, final_ended=lambda t: self.events.append(("final ended", t)))

    def search_ended(self, task: str, before: list[str]) -> list[dict]:
        self.events.append(("search ended", task, tuple(before)))
        return [{"task": task, "label": "best", "seed": s, "method": "spt-lora"} for s in (1, 2)]


def _complete(searcher: PipelineSearcher, trial_id: str) -> None:
    searcher.on_trial_result(trial_id, {"val_acc": 0.5, "epoch": 1, "epochs": 1, "training_iteration": 1})
    searcher.on_trial_complete(trial_id, {"val_acc": 0.5, "epoch": 1, "epochs": 1, "training_iteration": 1})


def test_a_tasks_final_runs_start_while_another_task_still_searches():
    driver = Driver(ready={"a"})
    register_hooks("p", driver.hooks())
    try:
        s = PipelineSearcher("p", ["a", "b"], run_final=True)
        first = [s.suggest(f"t{i}") for i in range(3)]  # a: 1 baseline + 2 searched; b's ranking not ready
        assert [c["task"] for c in first] == ["a"] * 3 and {c["phase"] for c in first} == {SEARCH}
        assert s.suggest("t3") is None  # nothing can start yet (not FINISHED: b and the finals are to come)
        driver.ready.add("b")
        b1 = s.suggest("t4")
        assert (b1["task"], b1["phase"]) == ("b", SEARCH)
        for i in range(3):
            _complete(s, f"t{i}")
        assert not driver.events  # acted on at the next suggest, after Tune's callbacks wrote the rows
        nxt = s.suggest("t5")
        assert driver.events == [("search ended", "a", ())]  # a's selection sees a's ended search only
        assert (nxt["task"], nxt["phase"]) == ("a", FINAL)  # final runs go first: while b still searches
        s.suggest("t6")
        s = pickle.loads(pickle.dumps(s))  # Tune checkpoints the searcher; the hooks are found by name
        for t in ("t5", "t6"):
            s.on_trial_complete(t, {"test_acc": 0.5})
        assert driver.events[-1] == ("final ended", "a")
        rest = [s.suggest(f"u{i}") for i in range(2)]
        assert [(c["task"], c["phase"]) for c in rest] == [("b", SEARCH)] * 2
        for t in ("t4", "u0", "u1"):
            _complete(s, t)
        finals = [s.suggest(f"v{i}") for i in range(2)]
        assert driver.events[-1] == ("search ended", "b", ("a",))
        assert [(c["task"], c["phase"], c["seed"]) for c in finals] == [("b", FINAL, 1), ("b", FINAL, 2)]
        assert s.suggest("v2") is None
        for t in ("v0", "v1"):
            s.on_trial_complete(t, {"test_acc": 0.5})
        assert s.suggest("v3") == Searcher.FINISHED
    finally:
        register_hooks("p", None)


def test_an_errored_search_trial_ends_the_search_and_no_final_phase_still_selects():
    driver = Driver(ready={"a"})
    register_hooks("q", driver.hooks())
    try:
        s = PipelineSearcher("q", ["a"], run_final=False)
        ids = [f"t{i}" for i in range(3)]
        for t in ids:
            s.suggest(t)
        _complete(s, "t0")
        _complete(s, "t1")
        s.on_trial_complete("t2", None, error=True)
        assert s.suggest("t3") == Searcher.FINISHED
        assert driver.events == [("search ended", "a", ())]  # the selection is persisted without finals too
    finally:
        register_hooks("q", None)


def test_a_trial_tune_errors_without_telling_the_searcher_still_ends_its_search():
    """Ray 2.x errors a trial whose reused actor is not ready in time without calling on_trial_complete: the
    watch reports it at the end of Tune's step, so the task's search ends instead of waiting forever."""
    from types import SimpleNamespace

    from spt_ray.pipeline import ErroredTrialWatch

    driver = Driver(ready={"a"})
    register_hooks("w", driver.hooks())
    try:
        s = PipelineSearcher("w", ["a"], run_final=False)
        for t in ("t0", "t1", "t2"):
            s.suggest(t)
        _complete(s, "t0")
        _complete(s, "t1")
        watch = ErroredTrialWatch("w")
        trials = [SimpleNamespace(trial_id="t0", status="TERMINATED"), SimpleNamespace(trial_id="t2", status="ERROR")]
        assert s.suggest("t3") is None  # t2 never reported: without the watch this is what Tune sees forever
        watch.on_step_end(0, trials)
        assert s.suggest("t4") == Searcher.FINISHED and driver.events == [("search ended", "a", ())]
        watch.on_step_end(1, trials)  # reported once only
        assert driver.events == [("search ended", "a", ())]
    finally:
        register_hooks("w", None)


def test_a_final_run_tune_errors_before_it_ran_is_handed_out_again():
    from types import SimpleNamespace

    from spt_ray.pipeline import ErroredTrialWatch

    driver = Driver(ready={"a"})
    register_hooks("f", driver.hooks())
    try:
        s = PipelineSearcher("f", ["a"], run_final=True)
        for t in ("t0", "t1", "t2"):
            s.suggest(t)
        for t in ("t0", "t1", "t2"):
            _complete(s, t)
        finals = [s.suggest("f0"), s.suggest("f1")]
        assert [c["seed"] for c in finals] == [1, 2]
        ErroredTrialWatch("f").on_step_end(0, [SimpleNamespace(trial_id="f0", status="ERROR")])
        again = s.suggest("f2")  # seed 1 again, as a new trial: no final seed is lost
        assert (again["phase"], again["seed"]) == (FINAL, 1)
        s.on_trial_complete("f1", {"test_acc": 0.5})
        assert ("final ended", "a") not in driver.events
        s.on_trial_complete("f2", {"test_acc": 0.5})
        assert driver.events[-1] == ("final ended", "a") and s.suggest("f3") == Searcher.FINISHED
    finally:
        register_hooks("f", None)
