"""Task deltas on disk: exactly what a plan trained (packed bits for quantized adapters) + the plan JSON.

A delta directory holds `delta.safetensors`, `plan.json` and `meta.json` (provenance: backbone hash, task,
metrics). It is written to a temporary directory and renamed into place, so it is complete or absent.
`meta.json` records the sha256 of `delta.safetensors` (`delta_sha256`, what `sha256sum` prints): a file
changed after export (a flipped value loads without any error and silently changes accuracy) is refused.

`merged_state` / `save_merged` fold a plan into plain weights instead: sparse, vector (bias / LayerNorm)
and LoRA deltas are additions to frozen tensors, so the result is an ordinary timm state dict (task head
included) that `timm.create_model(..., pretrained_cfg_overlay=dict(file=..., num_classes=N))` loads with
no spt code at all. Adapters are extra layers with a nonlinearity: they cannot fold, such plans stay deltas.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .modules.adapter import Adapter
from .modules.lora import LoRA
from .modules.quant import dequantize, pack_codes, quantize_codes, unpack_codes
from .modules.tuned import TunedLayerNorm, TunedLinear
from .plan import TuningPlan
from .surgery import PLAN_ATTR, apply_plan

DELTA_FILE, PLAN_FILE, META_FILE = "delta.safetensors", "plan.json", "meta.json"
MERGED_FILE = "merged.safetensors"  # written next to the delta by `spt-ray export --merged`
CHECKSUM_KEY = "delta_sha256"  # in meta.json: sha256 of the delta file's bytes
_PACKED = (".codes", ".mean", ".std")


class DeltaError(ValueError):
    """A delta directory that cannot be used (missing files, mismatched backbone, corrupt tensors)."""


def _quantized_weights(model: nn.Module) -> dict[str, int]:
    """Names of LoRA / Adapter weights trained at low precision -> their bit width."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoRA, Adapter)) and module.bits is not None:
            out[f"{name}.down.weight"] = out[f"{name}.up.weight"] = module.bits
    return out


def delta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trained tensor by parameter name; quantized weights as packed codes + mean + std."""
    quantized = _quantized_weights(model)
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in quantized:
            codes, mean, std = quantize_codes(p.detach().float().cpu(), quantized[name])
            state[name + ".codes"] = pack_codes(codes, quantized[name])
            state[name + ".mean"], state[name + ".std"] = mean.reshape(1), std.reshape(1)
        else:
            state[name] = p.detach().float().cpu().contiguous()
    return state


def save_delta(model: nn.Module, out_dir: str | Path, *, meta: dict[str, Any] | None = None) -> Path:
    """Write the delta of a model that went through apply_plan; replaces `out_dir` atomically."""
    plan: TuningPlan | None = getattr(model, PLAN_ATTR, None)
    if plan is None:
        raise DeltaError("the model has no applied plan; call apply_plan before saving a delta")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        data = save_safetensors(delta_state(model))
        (tmp / DELTA_FILE).write_bytes(data)
        (tmp / PLAN_FILE).write_text(plan.to_json())
        meta = {**(meta or {}), CHECKSUM_KEY: hashlib.sha256(data).hexdigest()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_delta(delta_dir: str | Path) -> tuple[TuningPlan, dict[str, torch.Tensor], dict[str, Any]]:
    delta_dir = Path(delta_dir)
    for name in (DELTA_FILE, PLAN_FILE, META_FILE):
        if not (delta_dir / name).is_file():
            raise DeltaError(f"{delta_dir}: missing {name}; export the trial again with `spt-ray export`")
    try:
        meta = json.loads((delta_dir / META_FILE).read_text())
        data = (delta_dir / DELTA_FILE).read_bytes()
    except (ValueError, OSError) as err:
        raise DeltaError(f"{delta_dir}: unreadable delta ({type(err).__name__}: {err}); export it again") from None
    if not isinstance(meta, dict):
        raise DeltaError(f"{delta_dir}: {META_FILE} is not a JSON object; export the trial again")
    recorded, actual = meta.get(CHECKSUM_KEY), hashlib.sha256(data).hexdigest()
    if recorded is not None and recorded != actual:  # deltas exported before checksums have none
        raise DeltaError(f"delta {delta_dir} changed since export: sha256 {actual[:16]}... != {str(recorded)[:16]}... "
                         f"recorded in {META_FILE}; re-export it with `spt-ray export`")
    try:
        plan = TuningPlan.from_json((delta_dir / PLAN_FILE).read_text())
        state = load_safetensors(data)
    except (ValueError, OSError, KeyError, TypeError, SafetensorError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DeltaError(f"{delta_dir}: unreadable delta ({type(err).__name__}: {reason}); export it again") from None
    return plan, state, meta


def load_delta(model: nn.Module, delta_dir: str | Path) -> nn.Module:
    """Apply the saved plan to a fresh backbone and load the trained values (quantized ones stay exact)."""
    plan, state, _ = read_delta(delta_dir)
    apply_plan(model, plan)
    named = dict(model.named_parameters())
    quantized = _quantized_weights(model)
    expected = {n for n, p in named.items() if p.requires_grad}
    stored = {n.removesuffix(s) for n in state for s in _PACKED if n.endswith(s)} | {
        n for n in state if not n.endswith(_PACKED)}
    if stored != expected:
        raise DeltaError(f"{delta_dir}: delta tensors do not match its plan ({len(stored ^ expected)} differ)")
    with torch.no_grad():
        for name in expected:
            p = named[name]
            if name in quantized:
                bits = quantized[name]
                codes = unpack_codes(state[name + ".codes"], bits, p.numel()).reshape(p.shape)
                p.copy_(dequantize(codes, state[name + ".mean"][0], state[name + ".std"][0], bits))
            else:
                p.copy_(state[name])
    for module in model.modules():
        if isinstance(module, (LoRA, Adapter)) and module.bits is not None:
            module.bits = None  # the weights now hold their quantized values exactly
    return model


def check_mergeable(plan: TuningPlan) -> None:
    """Refuse (DeltaError, one line) a plan whose deltas cannot fold into plain weights: one with Adapters."""
    adapters = sorted(name for name, tp in plan.tensors.items() if tp.kind == "adapter")
    if adapters:
        raise DeltaError(f"the plan has Adapter branches ({adapters[0]}, {len(adapters)} in all): adapters are "
                         "layers with a nonlinearity and cannot fold into the backbone's weights; keep the delta "
                         "(`spt-ray export` without --merged) and load it with `spt-ray evaluate` or "
                         "spt_core.load_delta")


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state dict of `model` (which went through apply_plan) with its deltas folded in.

    The model itself is left untouched. Quantized LoRA branches fold the weights their
    forward uses (spt_core.quantize_weight of the stored values). A plan with Adapters raises DeltaError.
    """
    plan: TuningPlan | None = getattr(model, PLAN_ATTR, None)
    if plan is None:
        raise DeltaError("the model has no applied plan; call apply_plan (or load_delta) before merging")
    check_mergeable(plan)
    tuned = {name: m for name, m in model.named_modules() if isinstance(m, (TunedLinear, TunedLayerNorm))}
    state = {name: t for name, t in model.state_dict().items()
             if not any(name.startswith(f"{prefix}.") for prefix in tuned)}
    with torch.no_grad():  # the same fold as merge_plan, module by module, without touching `model`
        for prefix, module in tuned.items():
            state.update({f"{prefix}.{name}": t for name, t in module.merged().state_dict().items()})
    return {name: t.detach().float().cpu().contiguous() for name, t in state.items()}


def save_merged(model: nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write merged_state(model) as one safetensors file (complete or absent: temporary name, then rename)."""
    path = Path(path)
    data = save_safetensors(merged_state(model), metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
