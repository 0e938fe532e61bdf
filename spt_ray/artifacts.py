"""Trial artifacts: export one trial's task delta from its last checkpoint, and evaluate a delta.

Every checkpoint a trial writes holds `trainer.pt` (the plan parameters), `plan.json` and `run.json`
(task, backbone, seed, recipe, evaluation split, metrics), so a delta can be rebuilt without Ray, the
sensitivity store or the search state.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from spt_core.experiment import BackboneRef, TaskRef, load_backbone, make_loader
from spt_core.export import DeltaError, load_delta, read_delta, save_delta
from spt_core.plan import TuningPlan
from spt_core.surgery import apply_plan
from spt_core.train import Trainer, TrainConfig

PLAN_FILE, RUN_FILE, TRAINER_FILE = "plan.json", "run.json", "trainer.pt"
_CKPT = re.compile(r"checkpoint_(\d+)$")


def write_run_files(directory: str | Path, plan: TuningPlan, run: dict[str, Any]) -> None:
    """What a checkpoint needs besides the trainer state to become a standalone delta."""
    (Path(directory) / PLAN_FILE).write_text(plan.to_json())
    (Path(directory) / RUN_FILE).write_text(json.dumps(run, default=str))


def find_checkpoint(storage: str | Path, trial_id: str, sweep: str | None = None) -> Path:
    """The newest checkpoint of a trial under `<storage>/tune/<sweep>-<phase>/*-<trial_id>/`."""
    tune_root = Path(storage) / "tune"
    if not tune_root.is_dir():
        raise ValueError(f"{storage} holds no Tune experiments; pass the --storage a sweep wrote to")
    pattern = f"{sweep}-*/*-{trial_id}" if sweep else f"*/*-{trial_id}"
    trial_dirs = sorted(tune_root.glob(pattern))
    if not trial_dirs:
        raise ValueError(f"no trial {trial_id!r} under {tune_root}; list trials with "
                         f"`spt-ray results query \"SELECT DISTINCT task, trial_id FROM results\"`")
    checkpoints = [(int(m.group(1)), p) for d in trial_dirs for p in d.iterdir()
                   if (m := _CKPT.search(p.name)) and (p / PLAN_FILE).is_file()]
    if not checkpoints:
        raise ValueError(f"trial {trial_id} has no complete checkpoint in {trial_dirs[0]}")
    return max(checkpoints)[1]


def export_trial(storage: str | Path, trial_id: str, out: str | Path, *, sweep: str | None = None) -> Path:
    """Write the trial's delta (safetensors + plan JSON + provenance) to `out`."""
    ckpt = find_checkpoint(storage, trial_id, sweep)
    plan = TuningPlan.from_json((ckpt / PLAN_FILE).read_text())
    run = json.loads((ckpt / RUN_FILE).read_text())
    task, backbone = TaskRef(**run["task"]), BackboneRef(**run["backbone"])
    model, info = load_backbone(backbone, task, seed=int(run["seed"]))
    apply_plan(model, plan)
    state = torch.load(ckpt / TRAINER_FILE, map_location="cpu", weights_only=True)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            named[name].copy_(value)
    meta = {**run, "trial_id": trial_id, "checkpoint": ckpt.name, "epoch": int(state["epoch"]),
            "backbone_hash": info["weights_sha256"], "backbone_info": info}
    return save_delta(model, out, meta=meta)


def evaluate_delta(delta_dir: str | Path, *, data_root: str | None = None, split: str | None = None,
                   batch_size: int | None = None, device: str = "auto", weights: str | None = None) -> dict[str, Any]:
    """Load a delta onto its backbone (checked by weight hash) and evaluate it on a split."""
    _, _, meta = read_delta(delta_dir)  # refuses a delta whose file changed since export (sha256)
    missing = [k for k in ("task", "backbone", "backbone_hash", "eval_split", "eval_batch_size") if k not in meta]
    if missing:
        raise DeltaError(f"{delta_dir}: meta.json lacks {', '.join(missing)}; export the trial again with "
                         "`spt-ray export`")
    task = TaskRef(**{**meta["task"], **({"data_root": data_root} if data_root else {})})
    backbone = BackboneRef(**{**meta["backbone"], **({"weights": weights} if weights else {})})
    model, info = load_backbone(backbone, task, seed=0)
    if info["weights_sha256"] != meta["backbone_hash"]:
        raise DeltaError(f"{delta_dir} was trained on backbone {meta['backbone_hash'][:12]}, not "
                         f"{info['weights_sha256'][:12]}; pass --weights with the original file")
    load_delta(model, delta_dir)
    split = split or meta["eval_split"]
    loader = make_loader(task, split, batch_size=batch_size or int(meta["eval_batch_size"]), train=False, seed=0)
    trainer = Trainer(model, TrainConfig(device=device, amp=bool(meta.get("amp", False))), progress=False)
    result = trainer.evaluate(loader)
    recorded = meta.get("metrics", {}).get("test_acc" if split == meta["eval_split"] and meta.get("phase") == "final"
                                           else "val_acc")
    return {"task": task.task, "split": split, "acc": result["acc"], "loss": result["loss"],
            "recorded_acc": recorded if split == meta["eval_split"] else None,
            "trainable_params": meta.get("trainable_params"), "trial_id": meta.get("trial_id")}
