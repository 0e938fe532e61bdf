"""Where a sweep's Optuna studies live, durably: a journal file under the sweep's storage, or an RDB URL.

Why durable: studies held in memory die with the driver, and optuna-dashboard / `optuna.visualization`
cannot see them. Each task's study is named `<sweep>/<task>` (unique in a storage shared by sweeps) and
records the sweep's storage root, so a study of another sweep is never continued or deleted by mistake.

* local storage: `<storage>/optuna/<sweep>.journal` (Optuna's JournalStorage with a file backend; the file
  lock lets `optuna-dashboard <file>` read it while the sweep writes);
* `optuna_storage` given: that RDB URL (`sqlite:///studies.db`, `postgresql://...`) or a journal path;
* storage a URI (s3://, gs://): the journal is written in a local folder and mirrored to
  `<storage>/optuna/<sweep>.journal` after every finished trial (`push`); a resumed driver on another
  machine fetches the mirror first (`pull`);
* `"memory"`: no persistence (tests, throw-away runs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend

from .storage import Storage

if TYPE_CHECKING:
    from .space import ResolvedSpace

logger = logging.getLogger(__name__)

JOURNAL_DIR = "optuna"
STORAGE_ATTR = "spt_storage"  # study user attribute: the storage root of the sweep that owns the study


def task_seed(seed: int, task: str) -> int:
    """A per-task sampler seed that does not change when other tasks are added or reordered."""
    return (int(seed) * 1_000_003 + zlib.crc32(task.encode())) % (2**31 - 1)


def study_name(sweep: str, task: str) -> str:
    return f"{sweep}/{task}"


def _is_url(target: str) -> bool:
    return "://" in target and not target.startswith("file://")


@dataclass(frozen=True)
class StudyStore:
    """One sweep's study storage. `target` is what Optuna (and optuna-dashboard) opens: an RDB URL, a local
    journal path, or "memory"; `mirror` is the URI a local journal is copied to (URI sweep storage)."""

    target: str
    owner: str  # the sweep's storage root (recorded in every study it creates)
    mirror: str | None = None  # the journal's path under the owner (URI) storage, when mirrored
    shared: bool = False  # given as optuna_storage: one target for every sweep (else one journal per sweep)

    def of_sweep(self, sweep: str) -> "StudyStore":
        """Where another sweep of the same storage keeps its studies (warm starts): the same target when it is
        shared, else that sweep's own journal."""
        if not self.persistent:
            raise ValueError("warm_start_from needs stored studies; drop optuna_storage: memory")
        return StudyStore(self.target, self.owner, shared=True) if self.shared else study_store(self.owner, sweep)

    @property
    def persistent(self) -> bool:
        return self.target != "memory"

    def open(self) -> BaseStorage | None:
        """An Optuna storage object (None: a study in memory); picklable, it reconnects on unpickling."""
        if not self.persistent:
            return None
        if _is_url(self.target):
            return optuna.storages.RDBStorage(self.target)
        self.pull()
        Path(self.target).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(self.target))

    def push(self) -> None:
        """Copy the local journal to its mirror (URI sweep storage only)."""
        if self.mirror and os.path.exists(self.target):
            store = Storage.of(self.owner)
            store.write_bytes(store.path(self.mirror), Path(self.target).read_bytes())

    def pull(self) -> None:
        """Fetch the mirror when the local journal is missing (a resumed driver on another machine)."""
        if self.mirror and not os.path.exists(self.target):
            store = Storage.of(self.owner)
            if store.exists(store.path(self.mirror)):
                Path(self.target).parent.mkdir(parents=True, exist_ok=True)
                Path(self.target).write_bytes(store.read_bytes(store.path(self.mirror)))


def study_store(storage_root: str, sweep: str, optuna_storage: str | None = None) -> StudyStore:
    """The study storage of sweep `sweep` whose results live under `storage_root` (see the module docstring)."""
    if optuna_storage:
        target = optuna_storage if optuna_storage == "memory" or _is_url(optuna_storage) \
            else str(Path(optuna_storage).expanduser().resolve())
        return StudyStore(target, storage_root, shared=True)
    if "://" not in storage_root or storage_root.startswith("file://"):
        local = storage_root.removeprefix("file://")
        return StudyStore(str(Path(local) / JOURNAL_DIR / f"{sweep}.journal"), storage_root)
    digest = hashlib.sha256(storage_root.encode()).hexdigest()[:12]
    local = Path(tempfile.gettempdir()) / "spt-ray-optuna" / digest / f"{sweep}.journal"
    return StudyStore(str(local), storage_root, mirror=f"{JOURNAL_DIR}/{sweep}.journal")


def fresh_study(storage: BaseStorage | None, name: str, owner: str, directions: list[str],
                sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """A new, empty study `name`. One left in the storage by an earlier run of this sweep whose Tune
    experiment was never saved is deleted (its trials belong to no experiment a resume could continue);
    one owned by another sweep is refused with the fix."""
    if storage is not None:
        try:
            old = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            old = None
        if old is not None:
            if old.user_attrs.get(STORAGE_ATTR) != owner:
                raise ValueError(f"the Optuna storage already holds a study {name!r} of another sweep "
                                 f"(storage {old.user_attrs.get(STORAGE_ATTR)}); choose a new --name or another "
                                 "--optuna-storage")
            logger.warning("deleting study %s left by an earlier run whose Tune experiment was never saved", name)
            optuna.delete_study(study_name=name, storage=storage)
    study = optuna.create_study(storage=storage, sampler=sampler, study_name=name, directions=directions)
    study.set_user_attr(STORAGE_ATTR, owner)
    return study


def warm_start_limit(num_samples: int) -> int:
    """How many of the paper's configurations a task's study starts with: a quarter of its trials (at least
    one, at most the four there are). Half was measured worse than a cold start on the mini suite at 8
    trials per task (bench/search_study.py: 52.7% vs 53.4% best val), where the reference recipe's lr is
    clipped to the bottom of the space; one or two leave the sampler the rest of the budget."""
    return max(1, num_samples // 4)


def task_study(storage: BaseStorage | None, name: str, owner: str, space: "ResolvedSpace", directions: list[str],
               sampler: optuna.samplers.BaseSampler, *, warm_starts: int,
               warm_from: list[optuna.trial.FrozenTrial] = ()) -> optuna.Study:
    """One task's fresh study (`fresh_study`), seeded: first the finished trials of another sweep (`warm_from`,
    from `warm_trials`), then up to `warm_starts` of the paper's configurations enqueued (run first)."""
    study = fresh_study(storage, name, owner, directions, sampler)
    study.add_trials(list(warm_from))
    for point in space.warm_starts(warm_starts) if warm_starts else []:
        study.enqueue_trial(point)
    return study


def load_trials(store: StudyStore, name: str) -> list[optuna.trial.FrozenTrial]:
    """Finished trials of study `name` in another sweep's study storage (warm starts); a one-line error when
    it is missing."""
    if not store.shared and store.mirror is None and not os.path.exists(store.target):
        raise ValueError(f"no Optuna study {name!r}: {store.target} does not exist; warm_start_from must name a "
                         "sweep of this storage (or share its optuna_storage)")
    try:
        study = optuna.load_study(study_name=name, storage=store.open())
    except KeyError:
        raise ValueError(f"no Optuna study {name!r} in {store.target}; warm_start_from must name a sweep of this "
                         "storage (or share its optuna_storage)") from None
    return [t for t in study.get_trials(deepcopy=True) if t.state.is_finished()]


SAMPLERS = ("tpe", "random")


def make_sampler(kind: str, seed: int, num_samples: int, *,
                 n_startup_trials: int | None = None) -> optuna.samplers.BaseSampler:
    """The sampler of one task's study.

    "tpe": multivariate TPE (models the joint density, so lr x budget interactions are learnt, where the
    univariate default treats each parameter alone), `group=True` for the conditional `bits`, and a
    constant liar (running trials count as bad ones, so parallel trials do not all pile onto the same
    point). The same sampler serves the multi-objective mode: TPE's multi-objective variant learns from
    its first trials on, where NSGA-II needs whole generations (with a population of 4 at the mini
    suite's 3 trials, it never left random sampling). Startup: max(2, min(10, n/3)) random trials, the
    enqueued warm starts included. "random": independent uniform sampling, the control of bench studies.
    """
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind != "tpe":
        raise ValueError(f"unknown sampler {kind!r}; use one of {SAMPLERS}")
    startup = n_startup_trials if n_startup_trials is not None else max(2, min(10, num_samples // 3))
    with warnings.catch_warnings():  # multivariate / group / constant_liar are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True,
                                          constant_liar=True)


def compatible(trials: list[optuna.trial.FrozenTrial], space: "ResolvedSpace", n_objectives: int,
                sweep: str) -> list[optuna.trial.FrozenTrial]:
    """Another sweep's finished trials, checked to come from the same space and objectives (a trial from a
    different space would teach the sampler about points it can never propose)."""
    probe = optuna.create_study()
    reference = probe.ask()
    space(reference)
    expected = reference.distributions
    for t in trials:
        bad = [k for k, d in t.distributions.items() if expected.get(k) != d]
        if bad or (t.values is not None and len(t.values) != n_objectives):
            what = f"parameter(s) {bad}" if bad else f"{len(t.values)} objective(s), not {n_objectives}"
            raise ValueError(f"warm start from sweep {sweep!r}: its studies differ from this sweep's ({what}); "
                             "warm-start only from a sweep with the same space and objectives")
    return trials



def warm_trials(store: StudyStore, sweep: str, task: str, space: "ResolvedSpace",
                n_objectives: int) -> list[optuna.trial.FrozenTrial]:
    """The finished trials of `task` in sweep `sweep`'s study, checked against this space and objectives."""
    return compatible(load_trials(store.of_sweep(sweep), study_name(sweep, task)), space, n_objectives, sweep)


__all__ = ["JOURNAL_DIR", "SAMPLERS", "StudyStore", "compatible", "fresh_study", "load_trials", "make_sampler",
           "study_name", "study_store", "task_seed", "task_study", "warm_start_limit",
           "warm_trials"]

