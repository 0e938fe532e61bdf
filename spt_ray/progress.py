"""What a sweep shows while it runs: one line per trial event (a live table on a terminal), a bar for the
sensitivity pass, and none of Ray's or Tune's own chatter unless asked for (`-v`).

Why our own lines: Tune's reporters print either nothing (verbose=0) or a table of every trial every few
seconds, and the workers' logs ("Checkpoint successfully created ..." per epoch) reach the driver's
terminal as well. A user of a sweep wants, per task: trials done of those planned, trials running, the
best validation accuracy so far, the time spent and an estimate of what is left.

Everything goes to stderr, so stdout keeps only the sweep's answer (`--json` stays parseable).

`SweepProgress` is a Tune Callback; Tune pickles it with the run config (tuner.pkl) and a restored
experiment gets it back, so it holds no stream or clock until `setup`, and counts from Tune's own trial
list (a resumed sweep starts with the trials finished before) rather than from events it saw.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Callable

from ray.tune import Callback

DONE_STATUSES = ("TERMINATED", "ERROR")
# Loggers whose INFO / WARNING lines are Tune's bookkeeping (snapshots, syncing, result files); their errors
# still show. `ray.tune.tune` keeps its warnings: the Ctrl-C notice comes from there (spt_ray/faults.py).
QUIET_LOGGERS = {"ray.tune": logging.ERROR, "ray.train": logging.ERROR, "ray.tune.tune": logging.WARNING,
                 "ray.data": logging.ERROR}


# ---- Ray's and Tune's own output -----------------------------------------------------------------
def ray_init_options(verbose: bool) -> dict[str, Any]:
    """`ray.init` keywords: without -v, the workers' stdout/stderr stay in Ray's log files (`ray logs`)."""
    return {"log_to_driver": bool(verbose), "logging_level": logging.INFO if verbose else logging.WARNING}


def tune_verbosity(verbose: bool) -> int:
    """Tune's own reporter: its experiment table and trial status heartbeats with -v, nothing without."""
    return 1 if verbose else 0


@contextmanager
def sweep_output(verbose: bool) -> Iterator[None]:
    """For the duration of a sweep: Ray's, Tune's and Optuna's chatter off unless `verbose` (restored after).

    Tune's newer output engine prints its experiment box even at verbose=0; its legacy engine
    (RAY_AIR_NEW_OUTPUT=0) prints nothing at verbose=0, so that is the quiet setting.
    """
    if verbose:
        yield
        return
    import optuna

    saved_env = os.environ.get("RAY_AIR_NEW_OUTPUT")
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    saved_optuna = optuna.logging.get_verbosity()
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved_env
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        optuna.logging.set_verbosity(saved_optuna)


# ---- the numbers of one moment -------------------------------------------------------------------
PHASE_METRIC = {"search": "val_acc", "final": "test_acc"}  # what "best" means in each phase


def clock(seconds: float | None) -> str:
    """1:02:03 / 4:05; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def phase_of(trial: Any, default: str = "search") -> str:
    return (trial.config or {}).get("phase") or default


def task_counts(trials: list[Any], planned: Mapping[str, Mapping[str, int]],
                override: tuple[str, str] | None = None, default_phase: str = "search",
                ) -> dict[str, dict[str, dict[str, Any]]]:
    """phase -> task -> done, running, planned, best (the phase's metric in any trial's last report) and
    work (the fraction done, a running trial counted by its epochs). `override`: (trial_id, status) of
    the trial an event is about, which Tune may not have marked yet when it calls the callback."""
    def empty(n: int) -> dict[str, Any]:
        return {"done": 0, "running": 0, "planned": n, "best": None, "work": 0.0}

    out = {phase: {t: empty(n) for t, n in tasks.items()} for phase, tasks in planned.items()}
    for trial in trials:
        phase = phase_of(trial, default_phase)
        row = out.setdefault(phase, {}).setdefault((trial.config or {}).get("task"), empty(0))
        status = override[1] if override and trial.trial_id == override[0] else trial.status
        last = trial.last_result or {}
        if status in DONE_STATUSES:
            row["done"] += 1
            row["work"] += 1.0
        elif status == "RUNNING":
            row["running"] += 1
            epoch, epochs = last.get("epoch"), last.get("epochs")
            row["work"] += min(1.0, epoch / epochs) if epoch and epochs else 0.0
        value = last.get(PHASE_METRIC.get(phase, "val_acc"))
        if isinstance(value, (int, float)) and math.isfinite(value) and (row["best"] is None or value > row["best"]):
            row["best"] = float(value)
    for rows in out.values():
        for row in rows.values():
            row["planned"] = max(row["planned"], row["done"] + row["running"])
    return out


def totals_of(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows.values()) for k in ("done", "running", "planned", "work")}


def eta(elapsed: float, work: float, work_at_start: float, total: float) -> float | None:
    """Seconds left at the rate of this invocation (work done before a resume does not count as speed)."""
    gained = work - work_at_start
    if gained <= 0 or total <= 0:
        return None
    return elapsed * max(0.0, total - work) / gained


def percent(value: float) -> str:
    """An accuracy as a person reads it here, in every table and line: `81.25%`."""
    return f"{100 * value:.2f}%"


def event_line(phase: str, elapsed: float, task: str, row: Mapping[str, Any], totals: Mapping[str, Any],
               left: float | None, what: str) -> str:
    """`[search 0:42] shapes 1/3 done, 2 running, best val_acc 81.25% | all 1/6, ETA 1:10 | finished <trial>`."""
    best = percent(row["best"]) if row["best"] is not None else "-"
    return (f"[{phase} {clock(elapsed)}] {task} {row['done']}/{row['planned']} done, {row['running']} running, "
            f"best {PHASE_METRIC.get(phase, 'val_acc')} {best} | all {totals['done']}/{totals['planned']}, "
            f"ETA {clock(left)} | {what}")


def table_lines(elapsed: float, counts: Mapping[str, Mapping[str, Mapping[str, Any]]], totals: Mapping[str, Any],
                left: float | None) -> list[str]:
    """The live table: one row per phase and task, then the sweep's totals."""
    lines = [f"{'phase':<8}{'task':<16}{'done':>9}{'running':>9}  best"]
    for phase, rows in counts.items():
        for task in sorted(rows):
            row = rows[task]
            best = f"{PHASE_METRIC.get(phase, '')} {percent(row['best'])}" if row["best"] is not None else "-"
            lines.append(f"{phase:<8}{task:<16}{row['done']:>4}/{row['planned']:<4}{row['running']:>9}  {best}")
    lines.append(f"{totals['done']}/{totals['planned']} trials done, {totals['running']} running, "
                 f"elapsed {clock(elapsed)}, ETA {clock(left)}")
    return lines


# ---- the Tune callback ---------------------------------------------------------------------------
class SweepProgress(Callback):
    """One line per trial start / end on stderr; on a terminal, a live per-task table under them.

    `planned`: phase -> task -> trials planned (an estimate where a selection decides, e.g. the final runs
    of a task none of whose searched trials completed); a trial's phase is `config["phase"]`, else
    `default_phase`.
    """

    def __init__(self, planned: Mapping[str, Mapping[str, int]], default_phase: str = "search",
                 live: bool | None = None, min_redraw_s: float = 1.0, store: str | None = None):
        self.planned = {phase: dict(tasks) for phase, tasks in planned.items()}
        self.default_phase, self.live, self.min_redraw_s = default_phase, live, min_redraw_s
        self.store = store  # the sensitivity store's actor name: its passes still computing are shown too
        self._reset()

    def _reset(self) -> None:
        self.started: set[str] = set()  # trials started in this invocation (a second start is a restart)
        self.start: float | None = None
        self.work_at_start: float | None = None
        self.drawn = 0  # lines of the live table now on screen
        self.last_draw = self.last_poll = float("-inf")  # monotonic() may start near 0 after a boot
        self.passes: dict[str, dict[str, Any]] = {}  # sensitivity passes computing at the last poll

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles the run config: no clock or screen state
        return {k: self.__dict__.get(k) for k in ("planned", "default_phase", "live", "min_redraw_s", "store")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def setup(self, **info: Any) -> None:
        self._reset()
        self.start = time.monotonic()

    # Tune's hooks
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        what = "restarted" if trial.trial_id in self.started else "started"
        self.started.add(trial.trial_id)
        self._event(trials, trial, "RUNNING", f"{what} {trial}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._event(trials, trial, "PENDING", f"{trial} failed (killed or its node lost); it restarts from its "
                                              "last checkpoint")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self._is_live() and time.monotonic() - self.last_draw >= self.min_redraw_s:
            self._draw(trials, None, None)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        metric = PHASE_METRIC.get(phase_of(trial, self.default_phase), "val_acc")
        value = (trial.last_result or {}).get(metric)
        shown = f" {metric} {percent(value)}" if isinstance(value, (int, float)) else ""
        self._event(trials, trial, "TERMINATED", f"finished {trial}{shown}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._event(trials, trial, "ERROR", f"error in {trial} (its error.txt is in the trial's folder)")

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """Tasks whose map is still computing while other tasks' trials run (the sweep is pipelined):
        a line when a pass starts and when it ends; on a terminal, rows of the live table."""
        if self.store is None or time.monotonic() - self.last_poll < self.min_redraw_s:
            return
        self.last_poll = time.monotonic()
        passes = poll_passes(self.store)
        if passes is None:
            self.store = None  # no store to ask (it is gone): stop asking
            return
        lines = [f"{p['task']}: computing its sensitivity map" for k, p in passes.items() if k not in self.passes]
        lines += [f"{p['task']}: sensitivity map computed" for k, p in self.passes.items() if k not in passes]
        self.passes = passes
        if lines or (self._is_live() and passes):
            elapsed = clock(time.monotonic() - (self.start or time.monotonic()))
            self._draw(trials, None, (lambda *_: "\n".join(f"[sensitivity {elapsed}] {x}" for x in lines))
                       if lines else None)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._is_live():
            self._draw(trials, None, None)
            self.drawn = 0  # leave the last table on screen

    # drawing
    def _is_live(self) -> bool:
        return sys.stderr.isatty() if self.live is None else self.live

    def _state(self, trials: list, override: tuple[str, str] | None):
        counts = task_counts(trials, self.planned, override, self.default_phase)
        totals = totals_of({(p, t): r for p, rows in counts.items() for t, r in rows.items()})
        if self.start is None:
            self.start = time.monotonic()
        if self.work_at_start is None:
            self.work_at_start = totals["work"] - (1.0 if override and override[1] in DONE_STATUSES else 0.0)
        elapsed = time.monotonic() - self.start
        return counts, totals, elapsed, eta(elapsed, totals["work"], self.work_at_start, totals["planned"])

    def _event(self, trials: list, trial: Any, status: str, what: str) -> None:
        phase, task = phase_of(trial, self.default_phase), (trial.config or {}).get("task", "?")
        self._draw(trials, (trial.trial_id, status),
                   lambda counts, totals, elapsed, left: event_line(phase, elapsed, task, counts[phase][task],
                                                                    totals, left, what))

    def _draw(self, trials: list, override: tuple[str, str] | None,
              line: Callable[..., str] | None) -> None:
        counts, totals, elapsed, left = self._state(trials, override)
        out = sys.stderr
        if not self._is_live():
            if line is not None:
                print(line(counts, totals, elapsed, left), file=out, flush=True)
            return
        text = f"\x1b[{self.drawn}F\x1b[J" if self.drawn else ""  # back to the table's first line, clear below
        if line is not None:
            text += line(counts, totals, elapsed, left) + "\n"
        table = table_lines(elapsed, counts, totals, left)
        table[-1:-1] = [f"{'map':<8}{p['task']:<16}{p['done']:>4}/{p['total'] or '?':<4} batches"
                        for p in self.passes.values()]
        out.write(text + "\n".join(table) + "\n")
        out.flush()
        self.drawn, self.last_draw = len(table), time.monotonic()


def planned_trials(spec: Any, phase: str, num_samples: int, searcher: Any = None) -> dict[str, dict[str, int]]:
    """phase -> task -> trials planned. A searcher with a fixed list (`configs`) is counted; otherwise the
    search phase splits `num_samples` evenly over the tasks, and (if the sweep has one) the final phase
    plans (the selected config + each baseline) x seeds per task."""
    configs = getattr(searcher, "configs", None)
    if isinstance(configs, list):
        planned: dict[str, dict[str, int]] = {phase: {t: 0 for t in spec.tasks}}
        for config in configs:
            rows = planned.setdefault(config.get("phase") or phase, {})
            rows[config.get("task")] = rows.get(config.get("task"), 0) + 1
        return planned
    planned = {phase: {t: num_samples // max(1, len(spec.tasks)) for t in spec.tasks}}
    if phase == "search" and spec.run_final:
        per_task = len(spec.final_seeds) * (int(spec.num_samples > 0) + len(spec.baselines))
        planned["final"] = {t: per_task for t in spec.tasks}
    return planned


def phase_callbacks(spec: Any, phase: str, searcher: Any, num_samples: int) -> list[Callback]:
    """Every Tune callback an experiment gets besides the results writer: progress, then the trackers."""
    from .trackers import tracker_callbacks

    from .store import store_actor_name

    progress = SweepProgress(planned_trials(spec, phase, num_samples, searcher), default_phase=phase,
                             store=store_actor_name(spec.storage))
    return [progress, *tracker_callbacks(spec.callbacks, sweep=spec.name, storage=spec.storage)]


# ---- the sensitivity pass ------------------------------------------------------------------------
def poll_passes(store: Any) -> dict[str, dict[str, Any]] | None:
    """The store's passes computing now (key -> task, done, total); `store` is its handle or actor name.
    None when there is no such store (never started, or gone)."""
    import ray

    from .store import NAMESPACE

    try:
        handle = ray.get_actor(store, namespace=NAMESPACE) if isinstance(store, str) else store
        return ray.get(handle.passes_running.remote(), timeout=10)
    except (ValueError, ray.exceptions.RayError):
        return None


def wait_for_rankings(store: Any, refs: Mapping[str, Any], num_returns: int | None = None,
                      interval_s: float = 0.5) -> dict[str, Any]:
    """Wait for `num_returns` (default: every) task's ranking (RankingHandle) from the sensitivity store,
    showing how far it is; returns the handles that arrived, by task.

    The pass runs as a Ray task of the store, far from this terminal; it reports its batches to the store
    (`pass_progress`), which this polls: one tqdm bar per pass computing now when stderr is a terminal
    (SPT_NO_PROGRESS=1 turns them off), and one line per task when its ranking arrives either way.
    """
    import ray
    from tqdm.auto import tqdm

    live = sys.stderr.isatty() and os.environ.get("SPT_NO_PROGRESS") != "1"
    waiting = {ref: task for task, ref in refs.items()}
    handles: dict[str, Any] = {}
    bars: dict[str, Any] = {}
    start = time.monotonic()
    try:
        while waiting and len(handles) < (num_returns or len(refs)):
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=interval_s)
            for ref in ready:
                task = waiting.pop(ref)
                handle = handles[task] = ray.get(ref)[0]
                bar = bars.pop(handle.key, None)
                if bar is not None:
                    bar.close()
                how = f"computed in {handle.sensitivity_s:.1f}s" if handle.source == "computed" else "loaded"
                print(f"[sensitivity {clock(time.monotonic() - start)}] {task}: map {how}, ranking of "
                      f"{handle.k:,} entries ({handle.nbytes / 2 ** 20:.1f} MiB) | {len(handles)}/{len(refs)} tasks",
                      file=sys.stderr, flush=True)
            if live and waiting and len(handles) < (num_returns or len(refs)):
                for key, p in (poll_passes(store) or {}).items():
                    bar = bars.get(key)
                    if bar is None:
                        bar = bars[key] = tqdm(total=p["total"], desc=f"sensitivity {p['task']}", unit="batch",
                                               leave=False, dynamic_ncols=True, position=len(bars))
                    bar.update(p["done"] - bar.n)
    finally:
        for bar in bars.values():
            bar.close()
    return handles
