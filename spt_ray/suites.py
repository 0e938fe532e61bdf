"""The recipe of each suite: the single source of the defaults `spt-ray tune --suite X` and sweeps/X.py use.

Each recipe is a plain SweepSpec dict (see spt_ray/spec.py); command-line flags override its keys.
"""

from __future__ import annotations

import copy
from typing import Any

from spt_core.data.mini import MINI_SPECS
from spt_core.data.fgvc import FGVC_TASKS
from spt_core.data.vtab import VTAB_TASKS

# The embedded default: generated tasks + the shipped mini ViT, sized to finish in minutes on 2 CPU cores.
# Five of the eight tasks, one or more per group, so the main job finishes within ten minutes on 2 CPU cores
# (five took 8 min 18 s, six 10 min 11 s). `--tasks` runs any subset, `spt-ray data mini` writes all eight.
MINI: dict[str, Any] = {
    "name": "mini",
    "suite": "mini",
    "tasks": ["textures", "cells", "landcover", "count", "orientation"],
    "backbone": {"name": "spt-mini-vit", "drop_path_rate": 0.1},
    "num_samples": 3,
    "baselines": ["linear", "full", "lora"],
    "search_baselines": False,  # baselines are compared in the final phase (uniform LoRA at SPT's budget)
    # no robust re-evaluation: with 3 trials per task its top 3 are every trial, and 2 more seeds each would
    # add 6 full-length runs per task to a 10-minute job (reeval_top: 3 in --config turns it on)
    "space": {"budget": [0.005, 0.03], "budget_unit": "fraction", "alpha": [2.0, 40.0], "rank": [4, 8],
              "lr": [2e-3, 1e-2]},
    "scheduler": {"kind": "asha", "grace_period": 2},
    "train": {"epochs": 4, "batch_size": 64, "lr": 5e-3, "weight_decay": 1e-4, "warmup_epochs": 1,
              "min_lr": 1e-5},
    "final_seeds": [42, 44],
    "max_concurrent": 2,
    "resources": {"cpu": 1, "gpu": 0},
    "sensitivity": {"num_batches": 8, "batch_size": 32},
}

# VTAB-1k with ViT-B/16 (ImageNet-21k): the paper's recipe, budgets 0.05M..1.0M, five final seeds.
VTAB: dict[str, Any] = {
    "name": "vtab",
    "suite": "vtab",
    "tasks": list(VTAB_TASKS),
    "backbone": {"name": "vit_base_patch16_224", "drop_path_rate": 0.1},
    "num_samples": 24,
    "baselines": ["linear", "lora", "adapter"],
    "space": {"budget": [5e4, 1e6], "budget_unit": "params", "alpha": [2.0, 40.0], "rank": [4, 8, 16],
              "lr": [1e-4, 1e-2]},
    "scheduler": {"kind": "asha", "grace_period": 10},
    "train": {"epochs": 100, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 10,
              "warmup_lr": 1e-6, "min_lr": 1e-5, "amp": True},
    "final_seeds": [42, 44, 82, 100, 800],
    "reeval_top": 3,  # robust selection: the top 3 of each task again with 2 more seeds (val200's noise is ~3.5 pts)
    "reeval_seeds": [1, 2],
    "max_concurrent": 16,
    "checkpoint_every": 10,  # ASHA's rungs (10, 20, 40, 80) fall on checkpoints; a restart repeats <= 9 epochs
    "resources": {"cpu": 4, "gpu": 0.5},
    "num_workers": 3,
    "sensitivity": {"num_batches": 16, "batch_size": 32, "num_gpus": 1},
}

# The five FGVC datasets: same engine, FGVC splits and augmentation, ViT-B/16.
FGVC_RECIPE: dict[str, Any] = {
    **copy.deepcopy(VTAB),
    "name": "fgvc",
    "suite": "fgvc",
    "tasks": list(FGVC_TASKS),
    "sensitivity": {"split": "train", "num_batches": 16, "batch_size": 32, "num_gpus": 1},
}

RECIPES = {"mini": MINI, "vtab": VTAB, "fgvc": FGVC_RECIPE}
# A minute-long smoke version of any recipe: the mini suite, tiny budgets of trials and epochs.
SMOKE: dict[str, Any] = {"suite": "mini", "tasks": list(MINI_SPECS)[:2], "backbone": MINI["backbone"],
                         "space": MINI["space"], "num_samples": 2, "baselines": ["linear"],
                         "search_baselines": False,
                         "train": {**MINI["train"], "epochs": 2}, "final_seeds": [42], "resources": {"cpu": 1},
                         "max_concurrent": 2, "sensitivity": MINI["sensitivity"], "num_workers": 0}


def recipe(suite: str, *, smoke: bool = False) -> dict[str, Any]:
    """A fresh copy of a suite's recipe (the smoke variant keeps the suite's name with a -smoke suffix)."""
    if suite not in RECIPES:
        raise ValueError(f"unknown suite {suite!r}; use one of {', '.join(RECIPES)}")
    spec = copy.deepcopy(RECIPES[suite])
    if smoke:
        spec.update(copy.deepcopy(SMOKE), name=f"{spec['name']}-smoke")
    return spec
