"""Rehearsal mode: the whole engine with only the training step simulated (bench/scale.py).

A full-scale sweep (19 tasks, hundreds of trials, ViT-B/16 sized sensitivity maps, 16 GPUs) cannot run
on a CPU machine, and its scheduling (store, per-task Optuna, ASHA, pipelining, Parquet, checkpoints,
resume) is what has to be seen at that scale. `run_sweep(spec, simulate=SimulatedStep(...))` runs the
real engine, and each trial replaces only the model and its data with `SimulatedTrainer`:

* each epoch sleeps the modelled GPU time of its training steps (and of its validation pass), times
  `scale` (the stated factor that makes the rehearsal fit in minutes); the sleep is what the trial
  reports as `train_s` / `eval_s`, so the engine's own cost is everything else;
* the plan is real (the trial builds it from the real ranking: allocation, trainable parameters,
  storage bytes), and every checkpoint holds a float32 tensor of the plan's true parameter count plus
  the optimizer's two moments (AdamW), as a real checkpoint would;
* accuracies are a deterministic function of the task, the configuration and the epoch (rising with
  epochs, so ASHA has something to rank): they exercise selection, not what it selects.

No backbone is built and no image is read: the rehearsal needs no weights and fits many concurrent trials
in a small machine's memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from spt_core.plan import TuningPlan

STATE_FILE = "simulated_state.json"
DELTA_FILE = "simulated_delta.safetensors"


@dataclass(frozen=True)
class SimulatedStep:
    """Modelled GPU seconds (on one trial's share of a GPU) and the factor they are scaled by."""

    search_epoch_s: float  # one training epoch of the search recipe (train800)
    final_epoch_s: float  # one training epoch of the final recipe (train800val200)
    val_s: float  # one validation pass (val200)
    test_s: float  # one test pass
    scale: float = 1.0  # real seconds slept per modelled second

    def __post_init__(self) -> None:
        if min(self.search_epoch_s, self.final_epoch_s, self.val_s, self.test_s) < 0 or not self.scale > 0:
            raise ValueError("simulated times must be >= 0 and scale > 0")


def quality(task: str, config: dict[str, Any]) -> float:
    """A configuration's final accuracy on a task, in [0.3, 0.9]: fixed by a hash (deterministic)."""
    keys = ("method", "budget", "alpha", "rank", "lr", "weight_decay", "bits", "label")
    text = json.dumps([task, *[str(config.get(k)) for k in keys]])
    return 0.3 + 0.6 * int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


class SimulatedTrainer:
    """The part of spt_core.train.Trainer the trainable uses (fit, evaluate, save, load, epoch, device)."""

    def __init__(self, sim: SimulatedStep, plan: TuningPlan, epochs: int, *, task: str, config: dict[str, Any],
                 final: bool):
        self.sim, self.plan, self.epochs, self.final = sim, plan, epochs, final
        self.q = quality(task, config)
        self.epoch = 0
        self.device = torch.device("cpu")

    def _sleep(self, modelled_s: float) -> float:
        t0 = time.perf_counter()
        time.sleep(modelled_s * self.sim.scale)
        return time.perf_counter() - t0

    def _acc(self, epoch: int) -> float:
        return self.q * (1 - math.exp(-3.0 * epoch / self.epochs))

    def fit(self, train: Any, val: Any = None, *, on_epoch: Callable[[dict[str, float]], bool] | None = None) -> None:
        while self.epoch < self.epochs:
            train_s = self._sleep(self.sim.final_epoch_s if self.final else self.sim.search_epoch_s)
            self.epoch += 1
            acc = self._acc(self.epoch)
            metrics = {"epoch": self.epoch, "train_loss": 1 - acc, "train_acc": acc, "train_s": train_s}
            if val is not None:
                metrics.update(val_acc=acc, val_loss=1 - acc, eval_s=self._sleep(self.sim.val_s))
            if on_epoch is not None and on_epoch(metrics):
                return

    def evaluate(self, loader: Any) -> dict[str, float]:
        eval_s = self._sleep(self.sim.test_s)
        acc = self._acc(self.epoch)
        return {"acc": acc, "loss": 1 - acc, "eval_s": eval_s}

    def save(self, directory: str | Path) -> Path:
        """The plan's parameters and AdamW's two moments at their true size, and the epoch."""
        n = int(self.plan.trainable_params)
        path = Path(directory) / DELTA_FILE
        save_file({name: torch.zeros(n) for name in ("params", "exp_avg", "exp_avg_sq")}, str(path))
        (Path(directory) / STATE_FILE).write_text(json.dumps({"epoch": self.epoch}))
        return path

    def load(self, directory: str | Path) -> None:
        self.epoch = int(json.loads((Path(directory) / STATE_FILE).read_text())["epoch"])
