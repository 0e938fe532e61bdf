"""SweepSpec: everything one sweep needs, validated, constructible from a plain dict or a YAML file.

`sweeps/*.py` and the CLI build a SweepSpec and call `spt_ray.run_sweep(spec)`; nothing else in spt_ray
reads user input, so every check (unknown keys, ranges, names that must be safe as Parquet partitions)
lives here and fails before Ray starts.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from spt_core.experiment import BackboneRef
from spt_core.sensitivity import check_sensitivity_split
from spt_core.train import TrainConfig

from .space import BASELINE_METHODS, SearchSpace
from .trackers import callback_names, parse_callbacks
from .studies import SAMPLERS, StudyStore, study_store
from .validate import check_fields, check_keys, read_yaml_mapping

DEFAULT_FINAL_SEEDS = (42, 44, 82, 100, 800)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # safe as a directory and a hive partition value
SUITES = ("mini", "vtab", "fgvc")


def absolute(location: str) -> str:
    """A local path made absolute (URIs unchanged): a relative path means nothing to a trial elsewhere."""
    return location if "://" in location else str(Path(location).expanduser().resolve())


def _safe_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not SAFE_NAME.match(value):
        raise ValueError(f"{what} {value!r} must match {SAFE_NAME.pattern} (it names directories and partitions)")
    return value


@dataclass(frozen=True)
class SensitivitySpec:
    """How the per-task sensitivity map is computed (part of its storage key) and where it runs.

    num_gpus / num_cpus are the Ray resources of the one-off computation task (a GPU if there is one);
    ranking_margin is the headroom of the stored ranking: it reaches alpha down to the space's low / margin.
    """

    split: str | None = None  # None: the suite's own; only training splits (train800 for VTAB-style, train for FGVC)
    num_batches: int = 16
    batch_size: int = 32
    seed: int = 0
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    ranking_margin: float = 1.25

    def __post_init__(self) -> None:
        check_sensitivity_split(self.split)  # val / test would leak evaluation data into parameter placement
        if self.num_batches < 1 or self.batch_size < 1:
            raise ValueError("sensitivity num_batches and batch_size must be >= 1")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError("sensitivity num_gpus and num_cpus must be >= 0")
        if self.ranking_margin < 1:
            raise ValueError(f"ranking_margin must be >= 1, got {self.ranking_margin}")


@dataclass(frozen=True)
class SchedulerSpec:
    """Early stopping for single-objective search: per-task ASHA on val_acc (or none: "fifo")."""

    kind: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        check_fields(self, "scheduler")
        if self.kind not in ("asha", "fifo"):
            raise ValueError(f"scheduler kind must be 'asha' or 'fifo', got {self.kind!r}")
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ValueError("ASHA needs grace_period >= 1 and reduction_factor > 1")


@dataclass(frozen=True)
class Resources:
    """Ray resources of one trial; fractional GPUs pack several small trials onto one device."""

    cpu: float = 1.0
    gpu: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)  # e.g. {"accelerator_type:H100": 0.01}

    def __post_init__(self) -> None:
        check_fields(self, "resources")  # a NaN cpu passes `cpu > 0` and the trial then never fits a node
        if any(v < 0 for v in self.custom.values()):
            raise ValueError(f"custom resources must be >= 0, got {self.custom}")
        if self.cpu <= 0 or self.gpu < 0:
            raise ValueError(f"a trial needs cpu > 0 and gpu >= 0, got cpu={self.cpu}, gpu={self.gpu}; set "
                             "--cpus-per-trial / --gpus-per-trial (resources.cpu / gpu in --config)")
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise ValueError(f"more than one GPU must be a whole number, got {self.gpu}; give a fraction below 1 "
                             "(trials share a GPU) or a whole number")

    def as_dict(self) -> dict[str, float]:
        return {"cpu": self.cpu, "gpu": self.gpu, **self.custom}


def _train_config(data: dict[str, Any] | TrainConfig | None, what: str, base: TrainConfig | None = None) -> TrainConfig:
    if isinstance(data, TrainConfig):
        return data
    check_keys(data or {}, [f.name for f in fields(TrainConfig)], what)
    try:
        return TrainConfig(**{**(base.to_dict() if base else {}), **(data or {})})
    except ValueError as err:  # name the section: `train` and `final_train` hold the same keys
        raise ValueError(f"{what}: {err}") from None


@dataclass(frozen=True)
class SweepSpec:
    """One sweep: search per task (train800 -> val200), then the final retraining with several seeds.

    `train` is the recipe of search trials (its lr / weight_decay are what baselines use; searched
    trials sample their own); `final_train` (default: `train`) is the recipe of the final phase.
    `num_samples` is per task. `address`: None attaches to a running cluster if there is one on this
    machine and otherwise starts Ray locally; "local" always starts a fresh local Ray; anything else
    ("auto", "ray://host:10001", "host:6379") attaches.
    """

    name: str
    data_root: str
    storage: str
    tasks: tuple[str, ...]
    suite: str = "mini"
    backbone: BackboneRef = field(default_factory=BackboneRef)
    img_size: int | None = None
    num_samples: int = 8
    space: SearchSpace = field(default_factory=SearchSpace)
    baselines: tuple[str, ...] = ()
    search_baselines: bool = True  # also run the baselines in the search phase (val numbers beside SPT's)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    seed: int = 0
    max_concurrent: int = 2
    resources: Resources = field(default_factory=Resources)
    train: TrainConfig = field(default_factory=TrainConfig)
    final_train: TrainConfig | None = None
    final_seeds: tuple[int, ...] = DEFAULT_FINAL_SEEDS
    run_final: bool = True
    multi_objective: bool = False  # search (val_acc, storage bytes of the task delta); the final phase runs each front
    sampler: str = "tpe"  # "tpe": multivariate TPE with a constant liar; "random": the control (spt_ray.search)
    paper_warm_start: bool = True  # each study starts with the paper's configurations (ResolvedSpace.warm_starts)
    warm_start_from: str | None = None  # another sweep (same space, same study storage) whose trials seed the studies
    optuna_storage: str | None = None  # None: <storage>/optuna/<name>.journal; an RDB URL, a journal path, "memory"
    reeval_top: int = 0  # robust selection: re-evaluate each task's top N candidates with `reeval_seeds` (0: off)
    reeval_seeds: tuple[int, ...] = (1, 2)  # extra train800 -> val200 seeds of each re-evaluated candidate
    resume: bool = False
    address: str | None = None
    sensitivity: SensitivitySpec = field(default_factory=SensitivitySpec)
    num_workers: int = 0
    max_failures: int = 2
    # A trial checkpoints every N epochs and after its last (1: every epoch). A restart (node loss, resume)
    # repeats at most N - 1 epochs; with ASHA's rungs at multiples of N a stopped trial's last epoch is saved.
    checkpoint_every: int = 1
    reuse_actors: bool = True
    callbacks: tuple[Any, ...] = ()  # trackers ("wandb", "mlflow", "tensorboard") and ray.tune.Callback objects
    verbose: bool = False  # Ray's and Tune's own output (worker logs, Tune's tables); progress lines either way

    def __post_init__(self) -> None:
        check_fields(self)  # types and finiteness first: "2" or NaN would crash or pass the checks below
        for part, what in ((self.backbone, "backbone"), (self.sensitivity, "sensitivity")):
            check_fields(part, what)
        _safe_name(self.name, "sweep name")
        if self.suite not in SUITES:
            raise ValueError(f"suite must be one of {SUITES}, got {self.suite!r}")
        check_sensitivity_split(self.sensitivity.split, self.suite)  # the suite's own training split only
        if not self.tasks:
            raise ValueError("a sweep needs at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be unique, got {list(self.tasks)}")
        for t in self.tasks:
            _safe_name(t, "task")
        if not self.data_root or not self.storage:
            raise ValueError("data_root and storage are required")
        for key in ("data_root", "storage"):  # trials run in other directories and on other nodes
            object.__setattr__(self, key, absolute(getattr(self, key)))
        bad = [b for b in self.baselines if b not in BASELINE_METHODS]
        if bad:
            raise ValueError(f"unknown baselines {bad}; choose from {BASELINE_METHODS}")
        if self.num_samples < 0 or (self.num_samples == 0 and not self.baselines):
            raise ValueError("num_samples must be >= 1 (or 0 with baselines only)")
        if self.num_samples == 0 and not self.run_final and not self.search_baselines:
            raise ValueError("num_samples 0 without the final phase runs nothing; give num_samples >= 1 "
                             "(--num-samples) or keep the final phase (drop --no-final)")
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}; pass --max-concurrent 1 or more")
        if self.run_final and not self.final_seeds:
            raise ValueError("the final phase needs at least one seed (or run_final: false)")
        if self.max_failures < 0 or self.num_workers < 0:
            raise ValueError("max_failures and num_workers must be >= 0")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 (epochs between checkpoints), got "
                             f"{self.checkpoint_every}; pass --checkpoint-every 1 (every epoch) or more")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.warm_start_from is not None:
            _safe_name(self.warm_start_from, "warm_start_from")
            if self.warm_start_from == self.name:
                raise ValueError(f"warm_start_from names this sweep ({self.name!r}); name another sweep, or use "
                                 "--resume to continue this one")
        if self.reeval_top < 0 or (self.reeval_top and not self.reeval_seeds):
            raise ValueError("reeval_top must be >= 0 and needs at least one of reeval_seeds")
        if self.train.seed in self.reeval_seeds:
            raise ValueError(f"reeval_seeds {list(self.reeval_seeds)} repeat the search seed {self.train.seed}; give "
                             "other seeds (a repeat re-measures nothing)")
        if self.optuna_storage is not None and not self.optuna_storage.strip():
            raise ValueError("optuna_storage is empty; give an RDB URL (sqlite:///studies.db), a journal path or "
                             "'memory', or leave it out (<storage>/optuna/<name>.journal)")
        if self.img_size is not None and self.img_size < 8:
            raise ValueError(f"img_size must be >= 8, got {self.img_size}")
        object.__setattr__(self, "callbacks", parse_callbacks(self.callbacks))  # names known, packages installed

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepSpec":
        """Build from plain values (YAML / JSON / CLI); unknown keys anywhere are a clear error."""
        data = dict(data)
        check_keys(data, [f.name for f in fields(cls)], "sweep spec")
        nested: dict[str, Any] = {}
        if "backbone" in data:
            b = data.pop("backbone")
            if isinstance(b, str):
                b = {"name": b}
            if not isinstance(b, BackboneRef):
                check_keys(b, [f.name for f in fields(BackboneRef)], "sweep spec `backbone`")
                b = BackboneRef(**b)
            nested["backbone"] = b
        if "space" in data:
            s = data.pop("space")
            nested["space"] = s if isinstance(s, SearchSpace) else SearchSpace.from_dict(s)
        for key, kind in (("scheduler", SchedulerSpec), ("resources", Resources), ("sensitivity", SensitivitySpec)):
            if key in data:
                v = data.pop(key)
                if not isinstance(v, kind):
                    check_keys(v or {}, [f.name for f in fields(kind)], f"sweep spec `{key}`")
                    v = kind(**(v or {}))
                nested[key] = v
        train = _train_config(data.pop("train", None), "sweep spec `train`")
        nested["train"] = train
        if data.get("final_train") is not None:
            nested["final_train"] = _train_config(data.pop("final_train"), "sweep spec `final_train`", base=train)
        for key in ("tasks", "baselines", "final_seeds", "reeval_seeds"):
            if key in data:
                v = data.pop(key)
                nested[key] = tuple(v.split(",")) if isinstance(v, str) else tuple(v)
        missing = [k for k in ("name", "data_root", "storage", "tasks") if k not in data and k not in nested]
        if missing:
            raise ValueError(f"sweep spec: missing required key(s) {missing}")
        return cls(**data, **nested)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SweepSpec":
        return cls.from_dict(read_yaml_mapping(path, "sweep spec"))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (round-trips through from_dict); recorded next to the sweep's results."""
        out = asdict(replace(self, callbacks=()))  # callback objects are recorded by name, never copied
        out["callbacks"] = callback_names(self.callbacks)
        out["train"] = self.train.to_dict()
        out["final_train"] = self.final_train.to_dict() if self.final_train else None
        return out

    def with_overrides(self, **changes: Any) -> "SweepSpec":
        return replace(self, **changes)

    # ---- derived ---------------------------------------------------------------------------------
    @property
    def final_recipe(self) -> TrainConfig:
        return self.final_train or self.train

    @property
    def study_store(self) -> StudyStore:
        """Where this sweep's Optuna studies live (spt_ray/studies.py)."""
        return study_store(self.storage, self.name, self.optuna_storage)

    @property
    def search_samples(self) -> int:
        """Trials of the search experiment: searched ones plus one fixed trial per baseline, per task."""
        return len(self.tasks) * (self.num_samples + (len(self.baselines) if self.search_baselines else 0))
