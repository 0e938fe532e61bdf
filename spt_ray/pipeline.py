"""Per-task pipelining of a sweep inside ONE Tune experiment: no barrier between tasks or phases.

A sweep used to run global stages (every task's map, then every task's search, then every task's final
runs), so every trial slot waited for the slowest task at each edge. Here the `PipelineSearcher` hands
out, per task and as soon as each is possible:

1. the task's search trials, once ITS ranking has arrived from the sensitivity store (the driver asks for
   every task's ranking at once; `Hooks.space` polls each future without blocking);
2. the task's final runs, once ITS search has ended: every search trial it suggested has finished
   (completed, stopped by ASHA, or errored). The protocol is the one of two global phases, per task: the
   selection reads validation columns only, from the completed searched trials of that task, and is
   persisted (`Hooks.search_ended` -> selection.persist_selection, restricted to the tasks whose search
   ended, so no selection is ever made from an unfinished search); the final runs are built from it
   (selection.final_configs), and final.json records what they were built from.

Final runs go first whenever a slot frees (they finish a task); then search trials round-robin over the
tasks whose ranking is ready. `suggest` returns None (Tune asks again later) while nothing can start
yet, and FINISHED when every task's last phase has ended.

Rows, selection and compaction happen in the driver process through `Hooks`, which the searcher finds
by sweep name (`register_hooks`): Tune pickles the searcher with the experiment and unpickles it on
`Tuner.restore`, so the searcher holds only plain state (per-task PerTaskSearchers, trial -> (task,
phase), counts), which Tune saves with every experiment checkpoint. Why not in `on_trial_complete`: Tune
calls the searcher there possibly before the results callback queued the trial's summary row; the end
of a search is acted on at the next `suggest`, after the callbacks ran.

Resume: a restored searcher continues where its last checkpoint was; a task's search that had ended
keeps its selection and final runs (an errored search trial that `--resume` reruns updates its rows and
study, not a selection already made: selection happens once per task, when its search ends).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.tune import Callback
from ray.tune.search import Searcher

from .results import read_results
from .resume import read_final_record, write_final_record
from .search import ResumableSearcher
from .selection import final_configs, persist_selection
from .space import ResolvedSpace

logger = logging.getLogger(__name__)

SEARCH, FINAL = "search", "final"
REEVAL = "reeval"  # robust selection's re-evaluation runs (search-phase rows) between a search and its selection


@dataclass
class Hooks:
    """What the searcher asks of the driver process (never pickled; found by sweep name)."""

    space: Callable[[str], ResolvedSpace | None]  # the task's search space once its ranking arrived, else None
    make_searcher: Callable[[str, ResolvedSpace], Searcher]  # the task's own study (PerTaskSearcher)
    search_ended: Callable[[str, list[str]], list[dict[str, Any]]]  # (task, tasks ended before): its final runs
    final_ended: Callable[[str], None]  # compact the task's final rows
    all_searches_ended: Callable[[], None] = lambda: None  # (the stage a Ctrl-C is reported in)
    reeval_runs: Callable[[str], list[dict[str, Any]]] = lambda task: []  # selection.reeval_configs of the task


_HOOKS: dict[str, Hooks] = {}
_LIVE: dict[str, "PipelineSearcher"] = {}  # sweep -> the searcher Tune is running now (the restored one on resume)


def register_hooks(sweep: str, hooks: Hooks | None) -> None:
    """Attach (or with None, detach) the driver's hooks for `sweep` in this process."""
    if hooks is None:
        _HOOKS.pop(sweep, None)
        _LIVE.pop(sweep, None)
    else:
        _HOOKS[sweep] = hooks


class PipelineSearcher(ResumableSearcher):
    """Search trials per task when its ranking is ready, its final runs when its search has ended."""

    def __init__(self, sweep: str, tasks: list[str], *, run_final: bool):
        super().__init__(metric=None, mode=None)  # final runs report no val_acc; each task's study has its own
        self.sweep, self.tasks, self.run_final = sweep, list(tasks), run_final
        self.searchers: dict[str, Searcher] = {}  # task -> its PerTaskSearcher, once its ranking arrived
        self.exhausted: set[str] = set()  # tasks whose searcher has nothing more to suggest
        self.trials: dict[str, tuple[str, str]] = {}  # trial id -> (task, phase)
        self.running: dict[tuple[str, str], set[str]] = {}  # (task, phase) -> trial ids not finished
        self.ended: dict[str, list[str]] = {SEARCH: [], FINAL: []}  # tasks whose phase ended, in order
        self.to_finalize: list[str] = []  # searches that ended, not yet acted on (see the module docstring)
        self.final_queue: list[dict[str, Any]] = []  # final runs not handed out yet
        self.reeval_queue: list[dict[str, Any]] = []  # re-evaluation runs not handed out yet
        self.reevaluated: set[str] = set()  # tasks whose re-evaluation was asked for (once per task)
        self.finals_pending: dict[str, int] = {}  # task -> final runs not handed out yet
        self.handed: dict[str, dict[str, Any]] = {}  # trial id -> the final / re-evaluation run it was given
        self.cursor = 0

    @property
    def hooks(self) -> Hooks:
        hooks = _HOOKS.get(self.sweep)
        if hooks is None:
            raise RuntimeError(f"no pipeline hooks registered for sweep {self.sweep!r} in this process")
        return hooks

    def get_state(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    # ---- handing out trials ----------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        _LIVE[self.sweep] = self
        self._act_on_ended_searches()
        if self.reeval_queue:
            cfg = self.reeval_queue.pop(0)
            return self._start(trial_id, cfg["task"], REEVAL, cfg)
        if self.final_queue:
            cfg = self.final_queue.pop(0)
            self.finals_pending[cfg["task"]] -= 1
            return self._start(trial_id, cfg["task"], FINAL, cfg)
        for task in self.tasks:
            if task not in self.searchers:
                space = self.hooks.space(task)
                if space is not None:
                    self.searchers[task] = self.hooks.make_searcher(task, space)
        for step in range(len(self.tasks)):
            task = self.tasks[(self.cursor + step) % len(self.tasks)]
            if task not in self.searchers or task in self.exhausted:
                continue
            cfg = self.searchers[task].suggest(trial_id)
            if cfg == Searcher.FINISHED:
                self.exhausted.add(task)
                self._maybe_search_ended(task)
                continue
            if cfg is None:
                continue
            self.cursor = (self.cursor + step + 1) % len(self.tasks)
            return self._start(trial_id, task, SEARCH, cfg)
        self._act_on_ended_searches()  # a search found exhausted just now, with nothing running
        if self.final_queue or self.reeval_queue:
            return self.suggest(trial_id)
        return Searcher.FINISHED if self._done() else None

    def _start(self, trial_id: str, task: str, phase: str, cfg: dict[str, Any]) -> dict[str, Any]:
        if phase != SEARCH:
            self.handed[trial_id] = cfg
        self.trials[trial_id] = (task, phase)
        self.running.setdefault((task, phase), set()).add(trial_id)
        return {**cfg, "task": task, "phase": SEARCH if phase == REEVAL else phase}  # re-evaluation: search rows

    def _done(self) -> bool:
        last = FINAL if self.run_final else SEARCH
        return len(self.ended[last]) == len(self.tasks) and not self.final_queue and not self.to_finalize \
            and not self.reeval_queue

    # ---- results -----------------------------------------------------------------------------------
    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        task, phase = self.trials.get(trial_id, (None, None))
        if phase == SEARCH:
            self.searchers[task].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        task, phase = self.trials.get(trial_id, (None, None))
        if task is None:
            return
        if phase == SEARCH:
            self.searchers[task].on_trial_complete(trial_id, result, error=error)
        self.running.get((task, phase), set()).discard(trial_id)
        if phase == SEARCH:
            self._maybe_search_ended(task)
        elif phase == REEVAL:
            if not self.running[(task, phase)] and not any(c["task"] == task for c in self.reeval_queue):
                self.to_finalize.append(task)  # re-evaluated: now its selection and final runs
        elif not self.running[(task, phase)] and not self.finals_pending.get(task) and task not in self.ended[FINAL]:
            self.ended[FINAL].append(task)
            self.hooks.final_ended(task)

    def unreported(self, errored: set[str]) -> list[str]:
        """Of these errored trial ids, those this searcher still counts as running."""
        return [t for ids in self.running.values() for t in ids if t in errored]

    def never_ran(self, trial_id: str) -> None:
        """A trial Tune errored before it ran (see ErroredTrialWatch): a final or re-evaluation run goes back
        to its queue, to run again as a new trial (a final seed is never lost); a search trial ends as errored
        (its study records it failed, as for any errored trial)."""
        task, phase = self.trials.get(trial_id, (None, None))
        cfg = self.handed.pop(trial_id, None)
        if cfg is None or phase == SEARCH:
            self.on_trial_complete(trial_id, error=True)
            return
        self.running[(task, phase)].discard(trial_id)
        if phase == FINAL:
            self.final_queue.insert(0, cfg)
            self.finals_pending[task] = self.finals_pending.get(task, 0) + 1
        else:
            self.reeval_queue.insert(0, cfg)

    def _maybe_search_ended(self, task: str) -> None:
        if task in self.exhausted and not self.running.get((task, SEARCH)) \
                and task not in self.ended[SEARCH] and task not in self.to_finalize:
            self.to_finalize.append(task)

    def _act_on_ended_searches(self) -> None:
        while self.to_finalize:
            task = self.to_finalize[0]
            if task not in self.reevaluated:  # robust selection first re-evaluates the top candidates
                self.reevaluated.add(task)
                runs = self.hooks.reeval_runs(task)
                if runs:
                    self.to_finalize.pop(0)
                    self.reeval_queue += runs
                    continue
            runs = self.hooks.search_ended(task, list(self.ended[SEARCH]))  # the selection is persisted with or without a final phase
            self.to_finalize.pop(0)
            self.ended[SEARCH].append(task)
            if len(self.ended[SEARCH]) == len(self.tasks):
                self.hooks.all_searches_ended()
            if not self.run_final:
                continue
            self.final_queue += runs
            self.finals_pending[task] = len(runs)
            if not runs:  # nothing to retrain (no completed trial, no baseline): the task is done
                self.ended[FINAL].append(task)
                self.hooks.final_ended(task)


class DriverHooks:
    """The driver's side of the pipeline (see `Hooks`): rankings as they arrive, the selection and final
    runs of a task whose search ended, compaction of a task's rows when one of its phases ended."""

    def __init__(self, spec: Any, storage: Any, writer: Any, futures: dict[str, Any], stage: list[str],
                 make_searcher: Callable[[str, ResolvedSpace], Searcher]):
        self.spec, self.storage, self.writer, self.futures, self.stage = spec, storage, writer, futures, stage
        self.handles: dict[str, Any] = {}
        self.hooks = Hooks(space=self.space, make_searcher=make_searcher, search_ended=self.search_ended,
                           final_ended=lambda task: writer.compact(task, FINAL),
                           all_searches_ended=self.all_searches_ended, reeval_runs=self.reeval_runs)

    def handle(self, task: str) -> Any:
        """The task's RankingHandle once the store has it (never blocks), else None."""
        if task not in self.handles:
            ready, _ = ray.wait([self.futures[task]], timeout=0)
            if not ready:
                return None
            self.handles[task] = ray.get(self.futures[task])[0]
        return self.handles[task]

    def space(self, task: str) -> ResolvedSpace | None:
        handle = self.handle(task)
        return None if handle is None else self.spec.space.resolve(handle.total_params)

    def all_searches_ended(self) -> None:
        self.stage[0] = "the final phase"

    def reeval_runs(self, task: str) -> list[dict[str, Any]]:
        """Robust selection (spec.reeval_top > 0): the task's top candidates again with more seeds."""
        if not getattr(self.spec, "reeval_top", 0):  # (robust selection: a spec field of its own)
            return []
        from .selection import reeval_configs

        self.writer.flush()
        return reeval_configs(read_results(self.storage, self.spec.name), task, self.spec.reeval_top,
                              tuple(self.spec.reeval_seeds))

    def search_ended(self, task: str, ended_before: list[str]) -> list[dict[str, Any]]:
        """Select on val (the tasks whose search ended, this one included), persist, compact; build the
        task's final runs and record them in final.json (spt_ray/resume.py)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import ray

        from .results import read_results
        from .resume import read_final_record, write_final_record
        from .selection import FRONT_COST, final_configs, pareto_front, persist_selection

        spec = self.spec
        self.writer.flush()
        table = read_results(self.storage, spec.name)
        table = table.filter(pc.fill_null(pc.is_in(table.column("task"), pa.array([*ended_before, task])), False))
        best = persist_selection(self.storage, spec.name, table)  # the one selection every report reads
        self.writer.compact(task, SEARCH)
        if task not in best and spec.num_samples > 0:
            logger.warning("no searched trial of %s completed all epochs; its final phase has baselines only", task)
        if not spec.run_final:
            return []
        mine = {task: best[task]} if task in best else {}
        layouts = {task: ray.get(self.handle(task).ref).layout} if mine else {}
        fronts = pareto_front(table, FRONT_COST[True]) if spec.multi_objective else None  # every front point
        runs = [r for r in final_configs(spec, mine, layouts, fronts) if r["task"] == task]
        record = read_final_record(self.storage, spec.name) or {}
        others = [r for r in record.get("runs", []) if r["task"] != task]
        write_final_record(self.storage, spec.name, others + runs, spec.final_recipe.to_dict(),
                           {t: b["trial_id"] for t, b in best.items()})
        return runs


class ErroredTrialWatch(Callback):
    """Tells the pipeline about trials that Tune ended in ERROR without telling their searcher.

    One path does that (Ray 2.x): a reused actor whose previous trial's thread has not ended within
    TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s; a stopped trial's thread can stay blocked on Tune's one-slot result
    queue, so a longer wait only stalls the actor: with a one-hour wait the rehearsal ran at half its rate). Tune
    then marks the new trial ERROR, never retries it and never calls `on_trial_complete`, so its task's search
    would never end and the sweep would wait forever: the full-scale rehearsal hung so at 1025 of 1045 runs.
    At the end of every Tune step, an errored trial the searcher still counts as running is handed back to it
    (`PipelineSearcher.never_ran`; Tune's own concurrency limiter still counts the trial: one slot fewer)."""

    def __init__(self, sweep: str):
        self.sweep = sweep

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        searcher = _LIVE.get(self.sweep)
        errored = {t.trial_id for t in trials if t.status == "ERROR"}
        for trial_id in searcher.unreported(errored) if searcher is not None and errored else []:
            logger.warning("trial %s ended in ERROR before it ran, and Tune did not tell its searcher: a final or "
                           "re-evaluation run is handed out again, a search trial counts as errored", trial_id)
            searcher.never_ran(trial_id)
