"""Trial artifacts: export one trial's task delta from its last checkpoint, and evaluate a delta.

Every checkpoint a trial writes holds `trainer.pt` (the plan parameters), `plan.json` and `run.json`
(task, backbone, seed, recipe, evaluation split, metrics), so a delta can be rebuilt without Ray, the
sensitivity store or the search state.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

import torch

from spt_core.experiment import BackboneRef, TaskRef, load_backbone, make_loader
from spt_core.embedded import EMBEDDED_CONFIG, EMBEDDED_NAME
from spt_core.export import (DELTA_FILE, MERGED_FILE, META_FILE, DeltaError, check_mergeable, load_delta, read_delta,
                             save_delta, save_merged)
from spt_core.export import PLAN_FILE as DELTA_PLAN_FILE
from spt_core.plan import TuningPlan
from spt_core.surgery import apply_plan
from spt_core.train import Trainer, TrainConfig

from .storage import Storage, is_uri

PLAN_FILE, RUN_FILE, TRAINER_FILE = "plan.json", "run.json", "trainer.pt"
_CKPT = re.compile(r"checkpoint_(\d+)$")


def write_run_files(directory: str | Path, plan: TuningPlan, run: dict[str, Any]) -> None:
    """What a checkpoint needs besides the trainer state to become a standalone delta."""
    (Path(directory) / PLAN_FILE).write_text(plan.to_json())
    (Path(directory) / RUN_FILE).write_text(json.dumps(run, default=str))


def _listing(storage: Storage, path: str) -> list[tuple[str, bool]]:
    """(name, is_dir) of the entries directly in a folder of the storage (one LIST on an object store)."""
    infos = storage.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [(i.base_name, i.type == pafs.FileType.Directory) for i in infos]


def find_checkpoint(storage: str | Storage, trial_id: str, sweep: str | None = None) -> tuple[Storage, str]:
    """The newest complete checkpoint of a trial under `<storage>/tune/<sweep>-<phase>/*-<trial_id>/`, as
    (storage, the checkpoint's path on `storage.fs`): local folders and bucket URIs alike."""
    storage = storage if isinstance(storage, Storage) else Storage.of(storage)
    tune_root = storage.path("tune")
    entries = _listing(storage, tune_root)
    if not any(is_dir for _, is_dir in entries):
        raise ValueError(f"{storage.root} holds no Tune experiments; pass the --storage a sweep wrote to")
    experiments = [n for n, is_dir in entries if is_dir and (sweep is None or n.startswith(f"{sweep}-"))]
    trial_dirs = sorted(f"{tune_root}/{exp}/{n}" for exp in experiments
                        for n, is_dir in _listing(storage, f"{tune_root}/{exp}")
                        if is_dir and n.endswith(f"-{trial_id}"))
    if not trial_dirs:
        raise ValueError(f"no trial {trial_id!r} under {storage.uri('tune')}; list trials with "
                         f"`spt-ray results query \"SELECT DISTINCT task, trial_id FROM results\"`")
    checkpoints = [(int(m.group(1)), f"{d}/{n}") for d in trial_dirs for n, is_dir in _listing(storage, d)
                   if is_dir and (m := _CKPT.search(n)) and storage.exists(f"{d}/{n}/{PLAN_FILE}")]
    if not checkpoints:
        raise ValueError(f"trial {trial_id} has no complete checkpoint in {trial_dirs[0]}")
    return storage, max(checkpoints)[1]


def timm_recipe(backbone: str, img_size: int) -> tuple[str, dict[str, Any]]:
    """The timm model name and keyword arguments that build `backbone` as a plain timm model: the embedded
    ViT is timm's VisionTransformer with its own config, which any `vit_*` name takes as overrides."""
    if backbone == EMBEDDED_NAME:
        return "vit_tiny_patch16_224", {**EMBEDDED_CONFIG, "img_size": img_size}
    return backbone, {"img_size": img_size}


def export_trial(storage: str | Storage, trial_id: str, out: str | Path, *, sweep: str | None = None,
                 merged: bool = False) -> Path:
    """Write the trial's delta (safetensors + plan JSON + provenance) to the local folder `out`; with
    `merged`, also `merged.safetensors`: a plain timm state dict with the delta folded in (see merged_usage)."""
    storage, ckpt = find_checkpoint(storage, trial_id, sweep)
    plan = TuningPlan.from_json(storage.read_bytes(f"{ckpt}/{PLAN_FILE}").decode())
    if merged:
        check_mergeable(plan)  # before anything is written
    run = json.loads(storage.read_bytes(f"{ckpt}/{RUN_FILE}"))
    task, backbone = TaskRef(**run["task"]), BackboneRef(**run["backbone"])
    model, info = load_backbone(backbone, task, seed=int(run["seed"]))
    apply_plan(model, plan)
    state = torch.load(io.BytesIO(storage.read_bytes(f"{ckpt}/{TRAINER_FILE}")), map_location="cpu",
                       weights_only=True)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            named[name].copy_(value)
    meta = {**run, "trial_id": trial_id, "checkpoint": ckpt.rsplit("/", 1)[1], "epoch": int(state["epoch"]),
            "backbone_hash": info["weights_sha256"], "backbone_info": info}
    out = save_delta(model, out, meta=meta)
    if merged:
        name, kwargs = timm_recipe(backbone.name, int(info["img_size"]))
        save_merged(model.eval(), out / MERGED_FILE, metadata={
            "format": "pt", "timm_model": name, "timm_kwargs": json.dumps(kwargs),
            "num_classes": str(info["num_classes"]), "trial_id": trial_id, "backbone_hash": info["weights_sha256"]})
    return out


def merged_usage(out: str | Path) -> str:
    """The Python line that loads `<out>/merged.safetensors` with timm alone (read from the file's metadata)."""
    from safetensors import safe_open

    path = Path(out) / MERGED_FILE
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    kwargs = "".join(f", {k}={v!r}" for k, v in json.loads(meta["timm_kwargs"]).items())
    return (f"timm.create_model({meta['timm_model']!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(path)!r}, "
            f"num_classes={meta['num_classes']}){kwargs})")


@contextlib.contextmanager
def local_delta(delta: str | Path) -> Iterator[Path]:
    """A delta folder as a local path: a URI's three files are copied to a temporary folder first."""
    if not is_uri(str(delta)):
        yield Path(delta)
        return
    storage = Storage.of(str(delta))
    with tempfile.TemporaryDirectory(prefix="spt-delta-") as tmp:
        for name in (DELTA_FILE, DELTA_PLAN_FILE, META_FILE):
            if storage.exists(storage.path(name)):  # a missing file is read_delta's one-line error
                (Path(tmp) / name).write_bytes(storage.read_bytes(storage.path(name)))
        yield Path(tmp)


def delta_model(delta_dir: str | Path, *, data_root: str | None = None,
                weights: str | None = None) -> tuple[torch.nn.Module, TaskRef, dict[str, Any]]:
    """A fresh backbone (checked by weight hash) with a local delta folder loaded: (model, task, meta)."""
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
    return model, task, meta


def evaluate_delta(delta_dir: str | Path, *, data_root: str | None = None, split: str | None = None,
                   batch_size: int | None = None, device: str = "auto", weights: str | None = None) -> dict[str, Any]:
    """Load a delta (a folder or a storage URI such as s3://bucket/deltas/x) onto its backbone and evaluate it."""
    with local_delta(delta_dir) as local:
        model, task, meta = delta_model(local, data_root=data_root, weights=weights)
    split = split or meta["eval_split"]
    loader = make_loader(task, split, batch_size=batch_size or int(meta["eval_batch_size"]), train=False, seed=0)
    trainer = Trainer(model, TrainConfig(device=device, amp=bool(meta.get("amp", False))), progress=False)
    result = trainer.evaluate(loader)
    recorded = meta.get("metrics", {}).get("test_acc" if split == meta["eval_split"] and meta.get("phase") == "final"
                                           else "val_acc")
    return {"task": task.task, "split": split, "acc": result["acc"], "loss": result["loss"],
            "recorded_acc": recorded if split == meta["eval_split"] else None,
            "trainable_params": meta.get("trainable_params"), "trial_id": meta.get("trial_id")}
