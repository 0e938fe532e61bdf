"""One real search-only sweep with every installed experiment tracker and a callback object, run once per session
(conftest.py's `searched_sweep`): test_search_studies reads its Optuna journal, test_trackers its tracker logs and
what the callback heard, each against the sweep's Parquet rows. Neither writes to its storage."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ray.tune import Callback

from spt_ray.trackers import TRACKERS

if TYPE_CHECKING:
    from spt_core.experiment import BackboneRef

NAME = "searched"
TASKS = ("shapes", "count")
TRIALS_PER_TASK = 3
INSTALLED = {name: importlib.util.find_spec(t.package) is not None for name, t in TRACKERS.items()}


class Recorder(Callback):
    """A user's own Tune callback, passed through the Python API."""

    def __init__(self):
        self.completed: list[str] = []

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed.append(trial.trial_id)


@dataclass(frozen=True)
class SearchedSweep:
    """The finished sweep: its storage, its name and the callback object it ran with."""

    storage: Path
    name: str
    recorder: Recorder


def run_searched_sweep(storage: Path, data_root: str, backbone: BackboneRef) -> SearchedSweep:
    """TASKS x TRIALS_PER_TASK searched trials of two epochs (FIFO: none stopped early), two at a time, no final
    phase; its Optuna studies in the default journal, <storage>/optuna/<NAME>.journal."""
    from spt_ray import SweepSpec, run_sweep

    os.environ["WANDB_MODE"] = "offline"  # no account, no network; `wandb sync` would upload later
    recorder = Recorder()
    spec = SweepSpec.from_dict({  # the backbone as a BackboneRef, not its dict: the spec takes either
        "name": NAME, "suite": "mini", "tasks": list(TASKS), "data_root": data_root, "storage": str(storage),
        "backbone": backbone, "num_samples": TRIALS_PER_TASK, "seed": 1, "max_concurrent": 2,
        "run_final": False, "train": {"epochs": 2, "batch_size": 32, "warmup_epochs": 0},
        "sensitivity": {"num_batches": 2}, "scheduler": {"kind": "fifo"},
        "callbacks": [*(n for n in ("tensorboard", "mlflow", "wandb") if INSTALLED[n]), recorder]})
    run_sweep(spec)
    return SearchedSweep(storage, NAME, recorder)
