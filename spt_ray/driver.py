"""`run_sweep(spec)`: the one entry point (CLI, sweep scripts, tests) for a whole sweep, on a laptop or a cluster.

The honest protocol, per task, in ONE Tune experiment that runs every task's phases as soon as each can
start (spt_ray/pipeline.py: no barrier between tasks or phases):

1. search: once the task's ranking has arrived, Optuna proposes configurations trained on train800 and
   scored on val200 (ASHA per task stops weak ones); baselines run once each as fixed configurations.
2. final: once the task's search has ended, its best configuration, chosen by val_acc ONLY
   (`select_best` reads a fixed list of validation columns and asserts it holds no test column; the
   selection is persisted), and every baseline are retrained on train800val200 with several seeds;
   test accuracy is evaluated once per run and reported as mean and std.

Resume: the experiment lives under `<storage>/tune/<sweep>-sweep`; with `resume=True` an
interrupted one continues through `Tuner.restore` with fresh ObjectRefs from the store (which reloads
maps from disk or memory, never recomputing a stored map); finished trials are kept, unfinished ones
continue from their last checkpoint. After each experiment every trial's log is reconciled into
Parquet (rows already stored are skipped), so a driver killed between a report and its write loses
nothing. Node loss: `FailureConfig(max_failures)` reschedules a trial elsewhere, from its checkpoint.

Faults: nothing is written before every check passes (spt_ray/preflight.py), so a sweep that failed one
reruns with the same command. Ctrl-C anywhere ends the sweep with SweepInterrupted (exit 130, one line
naming `--resume`), never with a phase treated as finished; a task's final runs are only ever built
from its ended search (final.json records them, spt_ray/resume.py). Errors from inside Ray tasks
and actors are re-raised as the exception they wrap (spt_ray/faults.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import ray
from ray.tune import CheckpointConfig, ExperimentAnalysis, FailureConfig, RunConfig, TuneConfig, Tuner
from ray.tune.logger import JsonLoggerCallback

from spt_core.experiment import TaskRef

from .faults import SweepInterrupted, sigint_held, tune_interrupt_messages, unwrap_ray_error
from .preflight import check_resources, check_sweep, dead_recorded_cluster
from .progress import phase_callbacks, ray_init_options, sweep_output, tune_verbosity, wait_for_rankings
from .results import ResultsCallback, ResultsWriter, RowContext, read_results, rows_from_trial_log
from .resume import purge_rows, restorable_trials
from .pipeline import DriverHooks, ErroredTrialWatch, PipelineSearcher, register_hooks
from .search import PerTaskScheduler, PerTaskSearcher
from .selection import (CONFIG_KEYS, FRONT_COST, SELECTION_COLUMNS, final_configs, pareto_front,  # noqa: F401
                        persist_selection, read_selection, select_best, summarize_final)
from .space import RankingNeeds, fixed_configs
from .simulate import SimulatedStep
from .spec import SweepSpec
from .storage import Storage
from .store import RankingHandle, SensitivityRequest, get_store
from .trainable import TrialContext, make_trainable
from .tune_env import tune_env

logger = logging.getLogger(__name__)

@dataclass
class SweepResult:
    """What a sweep produced; everything is also in the Parquet results under `results_path`."""

    name: str
    storage: str
    results_path: str
    best: dict[str, dict[str, Any]]  # task -> selected config + its val_acc / trainable_params / trial_id
    final: dict[str, dict[str, dict[str, Any]]]  # task -> label ("best" or a baseline) -> test mean/std/n
    pareto: dict[str, list[dict[str, Any]]]  # task -> non-dominated (val_acc max, trainable_params min) trials
    sensitivity: dict[str, dict[str, Any]]  # task -> key, source, k, ranking bytes vs full map bytes
    overhead: dict[str, float]  # wall time, busy (train+eval) time, slots, shares outside train+eval
    store_stats: dict[str, Any]
    trials: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> status -> count

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- Ray -----------------------------------------------------------------------------------------
@contextmanager
def ray_session(address: str | None, verbose: bool = False) -> Iterator[bool]:
    """Use the Ray this process is already connected to, else connect / start one (and stop it after).

    address None: ray.init()'s own rule (attach to a cluster running on this machine, else start a local
    one), except that a recorded cluster which no longer answers is ignored; "local": always a fresh local
    Ray; anything else: attach there.
    """
    if ray.is_initialized():
        yield False
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None and (dead := dead_recorded_cluster()):
        logger.warning("the Ray cluster recorded on this machine (%s) does not answer: starting a local Ray "
                       "(`ray stop` clears the record; --address attaches elsewhere)", dead)
        address = "local"
    try:
        with sigint_held():  # a Ctrl-C halfway through ray.init would crash the interpreter at exit
            ray.init(address=address, **ray_init_options(verbose),  # workers' logs reach the driver only with -v
                     **({"include_dashboard": False} if address == "local" else {}))
        yield True
    finally:
        if ray.is_initialized():
            ray.shutdown()


@contextmanager
def _results_writer(storage: Storage, sweep: str) -> Iterator[ResultsWriter]:
    """The sweep's writer for the duration of run_sweep; flushed and stopped on the way out."""
    writer = ResultsWriter.shared(storage, sweep)
    try:
        yield writer
    finally:
        writer.close()


def trial_slots(spec: SweepSpec) -> int:
    """How many trials can run at once: the concurrency limit, capped by the cluster's resources."""
    res = ray.cluster_resources()
    slots = spec.max_concurrent
    slots = min(slots, int(res.get("CPU", 0) // spec.resources.cpu + 1e-9) or 1)
    if spec.resources.gpu > 0:
        slots = min(slots, int(res.get("GPU", 0) // spec.resources.gpu + 1e-9) or 1)
    return max(1, slots)


def measure_overhead(epochs: list[dict[str, Any]], wall_s: float, slots: int,
                     sensitivity_wall_s: float) -> dict[str, float]:
    """Share of time outside training + evaluation, over the epochs this invocation ran.

    `epochs`: the per-epoch Tune results this invocation produced (`_run_phase` keeps those stamped after
    it started). A resumed sweep counts only what it ran itself: a run's `*_total` columns also hold the
    time of earlier invocations, and counting them made the share of a resumed sweep negative. `share`:
    of this invocation's wall time times its trial slots (everything: Ray start-up, sensitivity,
    scheduling gaps, actor start, data loading, checkpoints). `trial_share`: of the trials' own wall time
    (setup, checkpoints, reporting). One segment (a trial's start or restart) reports its setup on every
    epoch and its wall time cumulatively, so both count once per segment.
    """
    busy = sum((r.get("train_s") or 0.0) + (r.get("eval_s") or 0.0) for r in epochs)
    segments: dict[tuple[Any, Any], dict[str, Any]] = {}
    for r in epochs:
        seg = segments.setdefault((r.get("trial_id"), r.get("restarts")), {"setup_s": r.get("setup_s") or 0.0,
                                                                             "wall_s": 0.0})
        seg["wall_s"] = max(seg["wall_s"], r.get("wall_s") or 0.0)
    trial_wall = sum(seg["wall_s"] for seg in segments.values())
    capacity = wall_s * slots
    return {"wall_s": wall_s, "slots": float(slots), "busy_s": busy, "trial_wall_s": trial_wall,
            "setup_s": sum(seg["setup_s"] for seg in segments.values()),
            "checkpoint_s": sum(r.get("checkpoint_s") or 0.0 for r in epochs),
            "sensitivity_wall_s": sensitivity_wall_s, "runs": float(len({t for t, _ in segments})),
            "share": 1.0 - busy / capacity if epochs and capacity > 0 else math.nan,
            "trial_share": 1.0 - busy / trial_wall if trial_wall > 0 else math.nan}


# ---- one phase = one Tune experiment ---------------------------------------------------------------
def _reconcile(experiment_path: str, ctx: RowContext, writer: ResultsWriter,
               storage: Storage) -> tuple[list[dict[str, Any]], int]:
    """Rebuild every trial's rows from Tune's own per-trial logs; the writer skips rows already stored.

    Returns every per-epoch result of the experiment (for the overhead of this invocation) and how many
    trials its saved state holds unfinished. Read from storage, not from `fit`'s ResultGrid: after a
    Ctrl-C Tune marks the trials it stops TERMINATED in memory, while the state it saved says RUNNING.
    """
    epochs: list[dict[str, Any]] = []
    unfinished = 0
    analysis = ExperimentAnalysis(experiment_path, storage_filesystem=storage.fs if not storage.local else None)
    for trial in analysis.trials:
        log_path = f"{trial.path}/result.json"
        fs = trial.storage.storage_filesystem if trial.storage else storage.fs
        try:
            with fs.open_input_stream(log_path) as fh:
                lines = fh.read().decode().splitlines()
        except (FileNotFoundError, OSError):
            lines = []
        results = [json.loads(line) for line in lines if line.strip()]
        for r in results:
            r.setdefault("config", trial.config)
        error = trial.status == "ERROR"
        finished = trial.status in ("TERMINATED", "ERROR")
        unfinished += not finished
        rows = rows_from_trial_log(ctx.for_phase(trial.config.get("phase")), trial.trial_id, results, error=error,
                                   finished=finished)
        for row in rows:
            writer.put(row)
        epochs += [r for r in results if "epoch" in r]
    return epochs, unfinished


def _run_tune(spec: SweepSpec, storage: Storage, contexts: dict[str, TrialContext], futures: dict[str, Any],
              ctx: RowContext, *, searcher: Any, scheduler: Any, since: float,
              stage: list[str]) -> tuple[dict[str, dict[str, int]], list[dict[str, Any]]]:
    """The sweep's one Tune experiment (both phases, pipelined per task: spt_ray/pipeline.py), new or
    restored; returns trial counts per phase and the epochs it ran after `since`.

    Raises SweepInterrupted when Tune stopped with trials unfinished (Ctrl-C): after the rows of what did
    finish are in Parquet, and before anything could treat a phase as complete.
    """
    exp_name = f"{spec.name}-sweep"
    tune_root = storage.uri("tune")
    path = f"{tune_root}/{exp_name}"
    trainable = make_trainable(contexts, futures, spec.resources.as_dict())
    writer = ResultsWriter.shared(storage, spec.name)
    known = restorable_trials(storage, path)
    if known is not None and not spec.resume:
        raise ValueError(f"sweep {spec.name!r} already has an experiment at {path}; rerun with "
                         "--resume (run_sweep: resume=True) to continue it, or choose a new --name")
    for phase in ("search", "final"):
        purge_rows(storage, spec.name, phase, writer, keep=known or set(),
                   reason="their trials belong to no experiment this run continues (a driver killed before Tune "
                          "saved its state)")
    if known is not None:
        logger.info("resuming the sweep's experiment from %s", path)
        tuner = Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = Tuner(
            trainable,
            tune_config=TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=-1,  # searcher ends it
                                   max_concurrent_trials=spec.max_concurrent, reuse_actors=spec.reuse_actors,
                                   trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=RunConfig(name=exp_name, storage_path=tune_root,
                                 callbacks=[ResultsCallback(storage.root, ctx), JsonLoggerCallback(),
                                            ErroredTrialWatch(spec.name),
                                            # progress lines, trackers:
                                            *phase_callbacks(spec, "search", searcher, spec.search_samples)],
                                 failure_config=FailureConfig(max_failures=spec.max_failures),
                                 # one per trial: Tune deletes the older only once the newer is persisted,
                                 # so a resume or an export always finds a complete one; two kept doubled a
                                 # sweep's storage (AdamW moments included)
                                 checkpoint_config=CheckpointConfig(num_to_keep=1),
                                 verbose=tune_verbosity(spec.verbose)),
        )
    t0 = time.perf_counter()
    with tune_env(tuner) as settings:
        logger.info("sweep: Tune settings %s", settings)
        grid = tuner.fit()
    t1 = time.perf_counter()
    epochs, unfinished = _reconcile(grid.experiment_path, ctx, writer, storage)
    writer.flush()
    logger.info("sweep: Tune %.1fs, reconciliation %.1fs", t1 - t0, time.perf_counter() - t1)
    if unfinished:
        raise SweepInterrupted(spec.name, stage[0])
    for task in spec.tasks:  # rows the reconciliation added after a phase ended go into its file too
        for phase in ("search", "final"):
            writer.compact(task, phase)
    writer.flush()
    counts: dict[str, dict[str, int]] = {}
    for r in grid:
        status = "error" if r.error else "ok"
        phase_counts = counts.setdefault((r.config or {}).get("phase", "search"), {})
        phase_counts[status] = phase_counts.get(status, 0) + 1
    return counts, [r for r in epochs if r.get("timestamp", 0) >= int(since)]


def trial_name(trial: Any) -> str:
    """Short, stable trial names and directories (Tune's default packs the whole config into them)."""
    cfg = trial.config
    return f"{cfg.get('phase', 'search')}-{cfg.get('task', 'task')}-{cfg.get('label') or cfg.get('method', 'run')}-" \
        f"{trial.trial_id}"


def _sweep_exists(storage: Storage, name: str) -> bool:
    return storage.exists(storage.path("sweeps", name, "spec.json"))


def run_sweep(spec: SweepSpec, *, simulate: SimulatedStep | None = None) -> SweepResult:
    """Run (or resume) a whole sweep; see the module docstring. Returns the summary, also saved as JSON.

    `simulate`: rehearsal mode (bench/scale.py, spt_ray/simulate.py): the real engine with each trial's
    training step replaced by a modelled sleep; never for results.

    Ctrl-C at any point raises SweepInterrupted (a KeyboardInterrupt whose text says to rerun with
    `--resume`) once finished work is saved; an error raised inside a Ray task or actor is re-raised as
    the exception it wraps, with its own one-line message (spt_ray/faults.py).
    """
    stage = ["the checks before the sweep"]  # where a Ctrl-C landed, for its message
    try:
        with tune_interrupt_messages(), sweep_output(spec.verbose):
            return _sweep(spec, stage, simulate)
    except SweepInterrupted:
        raise
    except KeyboardInterrupt:
        raise SweepInterrupted(spec.name, stage[0]) from None
    except ray.exceptions.RayError as err:
        raise unwrap_ray_error(err) from None


def _sweep(spec: SweepSpec, stage: list[str], simulate: SimulatedStep | None = None) -> SweepResult:
    started, since = time.perf_counter(), time.time()
    storage = Storage.of(spec.storage)
    if _sweep_exists(storage, spec.name) and not spec.resume:
        raise ValueError(f"sweep {spec.name!r} already exists under {storage.root}; rerun with --resume "
                         "(run_sweep: resume=True) to continue it, or choose a new --name")
    check_sweep(spec)  # data, weights, search space, storage: before anything is written (spt_ray/preflight.py)
    stage[0] = "Ray start-up"
    with ray_session(spec.address, spec.verbose), _results_writer(storage, spec.name) as writer:
        check_resources(spec)
        stage[0] = "the sensitivity pass"
        store = get_store(storage.root, num_gpus=spec.sensitivity.num_gpus, num_cpus=spec.sensitivity.num_cpus)
        requests = {t: SensitivityRequest(TaskRef(spec.suite, t, spec.data_root, spec.img_size), spec.backbone,
                                          split=spec.sensitivity.split, num_batches=spec.sensitivity.num_batches,
                                          batch_size=spec.sensitivity.batch_size, seed=spec.sensitivity.seed)
                    for t in spec.tasks}
        needs = RankingNeeds(spec.space, margin=spec.sensitivity.ranking_margin)
        t0 = time.perf_counter()
        holder = f"{spec.name}/{uuid.uuid4().hex[:8]}"  # this run holds its rankings in the store until the end
        # every task's ranking at once; each task's trials start when ITS ranking arrives (spt_ray/pipeline.py)
        futures = {t: store.get_ranking.remote(req, needs, holder) for t, req in requests.items()}
        wait_for_rankings(store, futures, num_returns=1)  # the first (the backbone's hash), with a progress bar
        first = next(ray.get(f)[0] for f in futures.values() if ray.wait([f], timeout=0)[0])
        sensitivity_wall = time.perf_counter() - t0
        storage.write_bytes(storage.path("sweeps", spec.name, "spec.json"),  # from here on, the sweep exists
                            json.dumps(spec.to_dict(), indent=1, default=str).encode())
        contexts = {phase: TrialContext(phase, spec.suite, spec.data_root, spec.backbone, recipe.to_dict(),
                                        spec.img_size, spec.num_workers, storage.root, requests, needs, simulate,
                                        spec.checkpoint_every)
                    for phase, recipe in (("search", spec.train), ("final", spec.final_recipe))}
        rc = RowContext(spec.name, "search", spec.suite, spec.backbone.name, first.key_fields["backbone_hash"])

        fixed = fixed_configs(spec.baselines if spec.search_baselines else (), lr=spec.train.lr,
                              weight_decay=spec.train.weight_decay, bits=spec.space.fixed_bits)

        def task_searcher(task: str, space: Any) -> PerTaskSearcher:  # the task's own study, once its map is in
            return PerTaskSearcher({task: space}, spec.num_samples, seed=spec.seed,
                                   multi_objective=spec.multi_objective, fixed=fixed, sampler=spec.sampler,
                                   paper_warm_start=spec.paper_warm_start, warm_start_from=spec.warm_start_from,
                                   store=spec.study_store, sweep=spec.name)

        use_asha = spec.scheduler.kind == "asha" and not spec.multi_objective
        scheduler = PerTaskScheduler(spec.train.epochs, spec.scheduler.grace_period,
                                     spec.scheduler.reduction_factor) if use_asha else None
        pipeline = DriverHooks(spec, storage, writer, futures, stage, task_searcher)
        register_hooks(spec.name, pipeline.hooks)
        phase_s: dict[str, float] = {"start_s": t0 - started, "sensitivity_s": sensitivity_wall}
        t1 = time.perf_counter()
        stage[0] = "the search phase"
        try:
            trials, epochs = _run_tune(spec, storage, contexts, futures, rc, since=since, stage=stage,
                                       searcher=PipelineSearcher(spec.name, list(spec.tasks), run_final=spec.run_final),
                                       scheduler=scheduler)
        finally:
            register_hooks(spec.name, None)
        phase_s["tune_s"] = time.perf_counter() - t1
        handles = {t: ray.get(f)[0] for t, f in futures.items()}
        table = read_results(storage, spec.name)
        best = read_selection(storage, spec.name) or {}
        stage[0] = "the summary"
        store_stats = ray.get(store.stats.remote(holder))  # full_map_reads: this run's
        store_stats.pop("events", None)
        store.release.remote(holder)
        slots = trial_slots(spec)
    wall = time.perf_counter() - started
    result = SweepResult(
        name=spec.name, storage=storage.root, results_path=storage.uri("results", f"sweep={spec.name}"),
        best=best, final=summarize_final(table) if spec.run_final else {},
        pareto=pareto_front(table, FRONT_COST[spec.multi_objective]),
        sensitivity={t: _sensitivity_summary(h) for t, h in handles.items()},
        overhead={**measure_overhead(epochs, wall, slots, sensitivity_wall), **phase_s}, store_stats=store_stats,
        trials=trials)
    storage.write_bytes(storage.path("sweeps", spec.name, "result.json"),
                        json.dumps(result.to_dict(), indent=1, default=str).encode())
    return result


def _sensitivity_summary(h: RankingHandle) -> dict[str, Any]:
    return {"key": h.key, "source": h.source, "k": h.k, "num_entries": h.num_entries, "ranking_bytes": h.nbytes,
            "full_map_bytes": h.full_map_bytes, "ranking_share": h.nbytes / h.full_map_bytes,
            "sensitivity_s": h.sensitivity_s, "object": h.ref.hex(), "derive_s": h.info.get("derive_s")}

