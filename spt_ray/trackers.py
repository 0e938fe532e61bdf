"""Experiment trackers through Ray Tune's own integrations: `--callback wandb|mlflow|tensorboard`.

Why Tune's: its logger callbacks already turn every trial into a tracked run (config as parameters, every
report as a step of metrics) and run on the driver, so nothing in the trainable changes and a tracker
that is down never stops a trial. Each tracker is an optional extra (`pip install 'spt-ray[wandb]'`);
naming one that is not installed is a one-line error with that command, before anything is written.

Where runs go, unless the tracker's own environment variables say otherwise:

* wandb: project "spt-ray" (WANDB_PROJECT), group = the sweep's name; files under `<storage>/wandb` for
  a local storage (WANDB_DIR). WANDB_MODE=offline logs without an account (`wandb sync` later).
* mlflow: tracking URI `sqlite:///<storage>/mlflow.db` for a local storage (MLFLOW_TRACKING_URI),
  experiment = the sweep's name (MLFLOW_EXPERIMENT_NAME), each run tagged with the sweep. Not a `file://`
  store: MLflow 3 refuses those ("maintenance mode") unless MLFLOW_ALLOW_FILE_STORE=true; SQLite needs
  only SQLAlchemy and Alembic, which Optuna already brings. Tune's callback writes from the driver alone.

A run's phase (search or final), task, method and seed are parameters of every tracked run (its config).
* tensorboard: event files in every trial's folder under `<storage>/tune/` (`tensorboard --logdir`).

The Python API takes any `ray.tune.Callback` object in `SweepSpec.callbacks` beside these names.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tracker:
    module: str  # where Tune keeps the callback
    cls: str
    package: str  # what it imports (checked before the sweep starts)
    pip: str  # what provides it


TRACKERS = {
    "wandb": Tracker("ray.air.integrations.wandb", "WandbLoggerCallback", "wandb", "wandb"),
    "mlflow": Tracker("ray.air.integrations.mlflow", "MLflowLoggerCallback", "mlflow", "mlflow-skinny"),
    "tensorboard": Tracker("ray.tune.logger", "TBXLoggerCallback", "tensorboardX", "tensorboardX"),
}


def parse_callbacks(values: Iterable[Any] | str | None) -> tuple[Any, ...]:
    """Tracker names (a comma list, or repeated) and Callback objects, checked: unknown names and missing
    packages are a one-line error naming the fix. Duplicates are dropped (a tracker logs each run once)."""
    items = [values] if isinstance(values, str) else list(values or ())
    out: list[Any] = []
    for item in items:
        if not isinstance(item, str):
            from ray.tune import Callback  # only here: a spec without callback objects never imports Tune

            if isinstance(item, Callback):
                out.append(item)
                continue
            raise ValueError(f"callbacks: {item!r} is neither a tracker name ({', '.join(TRACKERS)}) nor a "
                             "ray.tune.Callback object")
        for name in (x.strip().lower() for x in item.split(",")):
            if not name:
                continue
            if name not in TRACKERS:
                raise ValueError(f"unknown callback {name!r}; choose from {', '.join(TRACKERS)} (--callback, or "
                                 "`callbacks` in the sweep spec)")
            check_installed(name)
            if name not in out:
                out.append(name)
    return tuple(out)


def check_installed(name: str) -> None:
    """ImportError with the pip command when tracker `name`'s package is missing."""
    tracker = TRACKERS[name]
    if importlib.util.find_spec(tracker.package) is None:
        raise ImportError(f"--callback {name} needs the {tracker.package} package; install it with "
                          f"`pip install 'spt-ray[{name}]'` (or `pip install {tracker.pip}`)")


def callback_names(callbacks: Iterable[Any]) -> list[str]:
    """What a spec records of its callbacks: tracker names, and class names of callback objects."""
    return [c if isinstance(c, str) else type(c).__name__ for c in callbacks]


def _local_dir(storage: str, name: str) -> str | None:
    if "://" in storage and not storage.startswith("file://"):
        return None
    path = os.path.join(storage.removeprefix("file://"), name)
    os.makedirs(path, exist_ok=True)
    return path


def make_tracker(name: str, *, sweep: str, storage: str) -> Any:
    """Tune's callback for tracker `name`, configured for this sweep and phase (see the module docstring)."""
    check_installed(name)
    tracker = TRACKERS[name]
    cls = getattr(importlib.import_module(tracker.module), tracker.cls)
    if name == "wandb":
        # upload_timeout: how long the sweep's end waits for the logging actors (Tune's default, 30 min, also
        # held a sweep whose logging actor was lost to an OOM kill; metrics only, no checkpoints, go up)
        kwargs: dict[str, Any] = {"project": os.environ.get("WANDB_PROJECT") or "spt-ray", "group": sweep,
                                  "upload_timeout": 300}
        if os.environ.get("WANDB_MODE"):  # the logging actors run on Ray workers, which may not share the env
            kwargs["mode"] = os.environ["WANDB_MODE"]
        folder = None if os.environ.get("WANDB_DIR") else _local_dir(storage, "wandb")
        return cls(**kwargs, **({"dir": folder} if folder else {}))
    if name == "mlflow":
        folder = None if os.environ.get("MLFLOW_TRACKING_URI") else _local_dir(storage, "")
        return cls(tracking_uri=f"sqlite:///{os.path.join(folder, 'mlflow.db')}" if folder else None,
                   experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME") or sweep,
                   tags={"sweep": sweep})
    return cls()


def tracker_callbacks(callbacks: Iterable[Any], *, sweep: str, storage: str) -> list[Any]:
    """The sweep's Tune callbacks: a tracker per name, callback objects as given."""
    return [make_tracker(c, sweep=sweep, storage=storage) if isinstance(c, str) else c
            for c in callbacks]
