"""Search across tasks inside ONE Tune experiment, with a separate Optuna study per task.

Why one experiment: one cluster-wide queue of trials (no idle slots while one task's search winds down),
one place for resume, one results stream. Why a study per task: hyper-parameters that work for one task
say little about another (budgets, learning rates and accuracy scales differ), so every task gets its
own seeded sampler and its own early stopping.

* `PerTaskSearcher` (a Tune `Searcher`) owns one `OptunaSearch` per task (see `make_sampler`: seeded
  multivariate TPE with a constant liar, single- or multi-objective; or random search, the control),
  suggests round-robin over the tasks that still have trials to run, adds `task` to
  the config, and routes `on_trial_result` / `on_trial_complete` by trial id to that task's study.
  Baselines are fixed configurations handed out first and never told to any study. Its whole state
  (studies, remaining counts, trial -> task map) is saved and restored by `save` / `restore`, which
  Tune calls on every experiment checkpoint and on `Tuner.restore`. Studies live in a `StudyStore`
  (spt_ray/studies.py: a journal file under the sweep's storage, or an RDB URL), named `<sweep>/<task>`,
  created on first use, each seeded with the paper's configurations (`ResolvedSpace.warm_starts`, via
  `enqueue_trial`) and optionally with the finished trials of another sweep's studies (same space).
  On restore the stored studies are reconciled with the restored state: trials created after Tune's
  last checkpoint (which Tune does not know and will suggest again) are dropped, and trials Tune will
  run again are reopened, so the studies hold exactly the trials of the experiment, each once.
* `PerTaskScheduler` keeps one ASHA per task (accuracy scales differ: a global ASHA would stop every
  trial of a hard task). Fixed (baseline) trials are never stopped early.
* `FixedSearcher` hands out a fixed list of configurations (the final phase), resumable the same way.

How ASHA-stopped trials reach Optuna (the caveat of OptunaSearch: it would tell Optuna such a trial is
COMPLETE with its truncated value, which biases TPE towards configurations that look good early):
a trial that ASHA stops before its last epoch is told to its study as PRUNED. Optuna records the last
intermediate value as its value (every epoch's val_acc was reported to the study as an intermediate
value), and TPE ranks pruned trials after every completed trial, by how far they got and then by that
value. So a stopped trial still informs the sampler (it was bad relative to the ones that went on) but
never competes with a configuration that was trained to the end. Only trials that ran all their epochs
are COMPLETE; a trial that raised is FAIL until it runs again (`--resume` reruns errored trials from
their checkpoint): then its study reopens it and records how that run ends, as the Parquet results do.
In multi-objective mode (val_acc max, storage_bytes of the task delta min) there is no ASHA (it takes
one metric), every trial runs to the end and is COMPLETE with both values, and each task's Pareto front
comes from its completed trials.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from .space import ResolvedSpace
from .studies import (SAMPLERS, StudyStore, make_sampler, study_name, task_seed,  # noqa: F401 (task_seed: API)
                      task_study, warm_start_limit, warm_trials)

logger = logging.getLogger(__name__)

METRIC, MODE = "val_acc", "max"
MO_METRICS, MO_MODES = ["val_acc", "storage_bytes"], ["max", "min"]
TUNE_ID_ATTR = "tune_trial_id"  # user attribute of every study trial: the Tune trial (Parquet trial_id)

def reached_end(result: dict[str, Any] | None) -> bool:
    return bool(result) and result.get("epoch") is not None and result.get("epochs") is not None \
        and result["epoch"] >= result["epochs"]


class ResumableSearcher(Searcher):
    """A Searcher whose whole state is its attributes: Tune saves it on every experiment checkpoint and
    restores it on `Tuner.restore` (files written by Tune itself, in the experiment directory)."""

    def get_state(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.get_state(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.set_state(pickle.load(fh))


class PerTaskSearcher(ResumableSearcher):
    """One Optuna study per task inside one Tune experiment; see the module docstring."""

    def __init__(self, spaces: dict[str, ResolvedSpace], num_samples: int, *, seed: int = 0,
                 multi_objective: bool = False, fixed: Sequence[dict[str, Any]] = (),
                 n_startup_trials: int | None = None, sampler: str = "tpe", paper_warm_start: bool = True,
                 warm_start_from: str | None = None, store: StudyStore | None = None, sweep: str = "sweep"):
        super().__init__(metric=METRIC, mode=MODE)
        if not spaces:
            raise ValueError("PerTaskSearcher needs at least one task")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; use one of {SAMPLERS}")
        self.tasks = list(spaces)
        self.spaces = dict(spaces)
        self.multi_objective = multi_objective
        self.sampler_kind, self.seed, self.num_samples, self.n_startup_trials = sampler, seed, num_samples, \
            n_startup_trials
        self.paper_warm_start, self.warm_start_from = paper_warm_start, warm_start_from
        self.store, self.sweep = store or StudyStore("memory", ""), sweep
        self.studies: dict[str, OptunaSearch] = {}  # created on first use (`_ensure_studies`)
        self.remaining = {t: int(num_samples) for t in self.tasks}
        self.pending_fixed = [(t, dict(c)) for t in self.tasks for c in fixed]
        self.trial_task: dict[str, str] = {}  # trial id -> task (searched trials)
        self.fixed_trials: set[str] = set()
        self.told: dict[str, str] = {}  # trial id -> state told to its study
        self.cursor = 0

    # ---- the studies -----------------------------------------------------------------------------
    def _ensure_studies(self) -> None:
        """Create every task's study in the store (on first use: a searcher built only to be replaced by
        Tune's restored one never touches the store), warm-started; see the module docstring."""
        if self.studies:
            return
        storage = self.store.open()
        metric, mode = (list(MO_METRICS), list(MO_MODES)) if self.multi_objective else (METRIC, MODE)
        directions = ["maximize" if m == "max" else "minimize" for m in (mode if self.multi_objective else [mode])]
        # a quarter of a task's trials at most (warm_start_limit); random search stays the cold control
        limit = warm_start_limit(self.num_samples) if self.paper_warm_start and self.sampler_kind != "random" else 0
        for task, space in self.spaces.items():
            sampler = make_sampler(self.sampler_kind, task_seed(self.seed, task), self.num_samples,
                                   n_startup_trials=self.n_startup_trials)
            name = study_name(self.sweep, task)
            warm = warm_trials(self.store, self.warm_start_from, task, space, len(directions)) \
                if self.warm_start_from else []
            study = task_study(storage, name, self.store.owner, space, directions, sampler, warm_starts=limit,
                               warm_from=warm)
            self.studies[task] = OptunaSearch(space, metric=metric, mode=mode, sampler=sampler, study_name=name,
                                              storage=study._storage)

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        for task in list(self.studies):
            self._reconcile(task)

    def __setstate__(self, state: dict[str, Any]) -> None:  # unpickled inside another searcher's state
        self.set_state(state)

    def _reconcile(self, task: str) -> None:
        """Make a stored study hold exactly the restored experiment's trials (see the module docstring):
        trials Tune's checkpoint does not know are dropped (enqueued ones go back to the queue), trials it
        still runs but the store says finished are reopened."""
        search = self.studies[task]
        known = {h._trial_id: rid for rid, h in search._ot_trials.items()}
        drop, reopen = set(), set()
        for t in search._ot_study.get_trials(deepcopy=False):
            rid = known.get(t._trial_id)
            if rid is None and t.state != TrialState.WAITING:
                drop.add(t._trial_id)
            elif rid is not None and rid not in search._completed_trials and t.state.is_finished():
                reopen.add(t._trial_id)
        if drop or reopen:
            logger.info("study %s: %d trial(s) after Tune's last checkpoint dropped, %d reopened",
                        search._ot_study.study_name, len(drop), len(reopen))
            self._rebuild(task, reopen=reopen, drop=drop)

    # ---- Tune's Searcher interface ---------------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # the spaces and metrics are fixed at construction

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        self._ensure_studies()
        if self.pending_fixed:
            task, cfg = self.pending_fixed.pop(0)
            self.fixed_trials.add(trial_id)
            return {**cfg, "task": task, "searched": False}
        for step in range(len(self.tasks)):
            task = self.tasks[(self.cursor + step) % len(self.tasks)]
            if self.remaining[task] > 0:
                self.cursor = (self.cursor + step + 1) % len(self.tasks)
                params = self.studies[task].suggest(trial_id)
                self.studies[task]._ot_trials[trial_id].set_user_attr(TUNE_ID_ATTR, trial_id)  # Parquet's trial_id
                self.remaining[task] -= 1
                self.trial_task[trial_id] = task
                return {**params, "task": task, "searched": True}
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        task = self.trial_task.get(trial_id)
        if task is not None and self.told.get(trial_id) == "FAIL":  # running again (resumed errored trial)
            self._reopen(task, trial_id)
        if task is not None and not self.multi_objective and METRIC in result:
            self.studies[task].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        task = self.trial_task.get(trial_id)
        if task is not None and self.told.get(trial_id) == "FAIL" and not error:
            self._reopen(task, trial_id)
        if task is None or trial_id in self.told:
            return
        study = self.studies[task]
        if error:
            study.on_trial_complete(trial_id, None, error=True)
            self.told[trial_id] = "FAIL"
        elif reached_end(result):
            study.on_trial_complete(trial_id, result)
            self.told[trial_id] = "COMPLETE"
        else:  # stopped early by the scheduler: PRUNED, valued at its last intermediate val_acc
            study.on_trial_complete(trial_id, None, error=False)
            self.told[trial_id] = "PRUNED"
        self.store.push()  # a journal mirrored to URI storage stays at most one trial behind

    def _reopen(self, task: str, trial_id: str) -> None:
        """Make a trial told FAIL running again in its study, so that its outcome on `--resume` (Tune reruns
        errored trials from their checkpoint) is what the study records, as the Parquet results do."""
        self._rebuild(task, reopen={self.studies[task]._ot_trials[trial_id]._trial_id})
        del self.told[trial_id]

    def _rebuild(self, task: str, *, reopen: set[int] = frozenset(), drop: set[int] = frozenset()) -> None:
        """Optuna never reopens or deletes a trial, so the study is rebuilt in its own storage: same sampler,
        pruner, name and attributes, every trial copied in order (numbers and intermediate values kept)
        except those in `drop` (an enqueued one is enqueued again), those in `reopen` as RUNNING.
        OptunaSearch's live trial handles are pointed at the copies."""
        search = self.studies[task]
        old: optuna.Study = search._ot_study
        trials = old.get_trials(deepcopy=True)
        system, user = old._storage.get_study_system_attrs(old._study_id), old.user_attrs
        persistent = not isinstance(old._storage, optuna.storages.InMemoryStorage)
        if persistent:
            optuna.delete_study(study_name=old.study_name, storage=old._storage)
        new = optuna.create_study(storage=old._storage if persistent else None, sampler=old.sampler,
                                  pruner=old.pruner, study_name=old.study_name, directions=old.directions)
        for key, value in system.items():
            new._storage.set_study_system_attr(new._study_id, key, value)
        for key, value in user.items():
            new.set_user_attr(key, value)
        ids, requeue = {}, []
        for frozen in trials:
            if frozen._trial_id in drop:
                if "fixed_params" in frozen.system_attrs:
                    requeue.append(frozen.system_attrs["fixed_params"])
                continue
            if frozen._trial_id in reopen:
                frozen.state, frozen.values, frozen.datetime_complete = TrialState.RUNNING, None, None
            ids[frozen._trial_id] = new._storage.create_new_trial(new._study_id, template_trial=frozen)
        for params in requeue:
            new.enqueue_trial(params)
        search._ot_study = new
        search._ot_trials = {tid: optuna.Trial(new, ids[t._trial_id]) for tid, t in search._ot_trials.items()}
        search._completed_trials -= {tid for tid, t in search._ot_trials.items() if t._trial_id in
                                     {ids[i] for i in reopen}}

    # ---- introspection ---------------------------------------------------------------------------
    def study(self, task: str) -> optuna.Study:
        self._ensure_studies()
        return self.studies[task]._ot_study

    def trial_states(self, task: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.study(task).trials:
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        return counts


class FixedSearcher(ResumableSearcher):
    """Hands out `configs` in order, then FINISHED; resumable (the index is its state)."""

    def __init__(self, configs: Sequence[dict[str, Any]]):
        super().__init__(metric=None, mode=None)
        self.configs = [dict(c) for c in configs]
        self.next_index = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.next_index >= len(self.configs):
            return Searcher.FINISHED
        self.next_index += 1
        return dict(self.configs[self.next_index - 1])

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        pass


class PerTaskScheduler(FIFOScheduler):
    """One ASHA per task (by `config["task"]`) on val_acc over epochs; `searched: False` trials always go on.

    ASHA's rungs are not part of Tune's experiment checkpoint: after `Tuner.restore` every task's ASHA
    starts with empty rungs and the restored trials rejoin them as they report.
    """

    def __init__(self, max_t: int, grace_period: int = 1, reduction_factor: float = 2.0):
        super().__init__()
        self.max_t, self.grace_period, self.reduction_factor = max_t, min(grace_period, max_t), reduction_factor
        self.per_task: dict[str, AsyncHyperBandScheduler] = {}
        self.members: dict[str, str] = {}  # trial id -> task, for trials under an ASHA
        # no experiment-wide metric: each task's ASHA has its own, and final runs report test_acc, not val_acc
        self._metric, self._mode = None, None

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def _asha(self, trial: Any) -> AsyncHyperBandScheduler | None:
        if not trial.config.get("searched", True) or trial.config.get("phase") == "final":
            return None  # baselines and final runs (the sweep's experiment holds both phases) always go on
        task = trial.config["task"]
        if task not in self.per_task:
            self.per_task[task] = AsyncHyperBandScheduler(
                time_attr="epoch", metric=METRIC, mode=MODE, max_t=self.max_t, grace_period=self.grace_period,
                reduction_factor=self.reduction_factor, stop_last_trials=False)
        if trial.trial_id not in self.members:
            self.per_task[task].on_trial_add(None, trial)
            self.members[trial.trial_id] = task
        return self.per_task[task]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._asha(trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        asha = self._asha(trial)
        if asha is None:
            return TrialScheduler.CONTINUE
        return asha.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        asha = self._asha(trial)
        if asha is not None:
            asha.on_trial_complete(tune_controller, trial, result)
            self.members.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        task = self.members.pop(trial.trial_id, None)
        if task is not None:
            self.per_task[task].on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "PerTaskScheduler(ASHA per task: " + ", ".join(
            f"{t}: stopped {a._num_stopped}" for t, a in self.per_task.items()) + ")"
