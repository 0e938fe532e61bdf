"""apply_plan: in-place model surgery that makes exactly the plan's parameters trainable."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .layout import LogicalTensor, ModelLayout
from .modules.tuned import WHOLE, TunedLayerNorm, TunedLinear
from .plan import TensorPlan, TuningPlan

PLAN_ATTR = "spt_plan"


def apply_plan(model: nn.Module, plan: TuningPlan) -> nn.Module:
    """Freeze `model`, then add and unfreeze what `plan` tunes. Returns the same model.

    Frozen weights are not copied or modified; float LoRA / Adapter up-projections and every delta start at
    zero, so the output right after surgery equals the original's. Quantized up-projections start small and
    non-zero instead (the paper's init; see `init_up_weight`), so those plans move the output slightly.
    """
    if getattr(model, PLAN_ATTR, None) is not None:
        raise ValueError("a plan was already applied to this model; apply plans to a fresh backbone")
    layout = ModelLayout.from_model(model)
    if layout.signature != plan.layout.signature:
        raise ValueError("the plan was made for a different model (layout signature "
                         f"{plan.layout.signature} != {layout.signature}); build the plan from this backbone")
    for name, p in model.named_parameters():
        p.requires_grad_(plan.train_head and name in layout.head_names)

    by_param: dict[str, list[tuple[LogicalTensor, TensorPlan]]] = defaultdict(list)
    for name, tp in plan.tensors.items():
        t = layout[name]
        by_param[t.param].append((t, tp))
    parts_per_param = defaultdict(int)
    for t in layout:
        parts_per_param[t.param] += 1

    for pname, entries in by_param.items():
        t0 = entries[0][0]
        if len(entries) == parts_per_param[pname] and all(tp.kind == "full" for _, tp in entries):
            model.get_parameter(pname).requires_grad_(True)
            continue
        host = _host(model, t0)
        flat_parts = []
        for t, tp in entries:
            if tp.kind in ("lora", "adapter"):
                part = t.part or WHOLE
                if tp.kind == "lora":
                    host.add_lora(part, tp.rank, dropout=plan.lora_dropout, drop_path=plan.lora_drop_path, bits=tp.bits)
                else:
                    host.add_adapter(part, tp.rank, bits=tp.bits)
                continue
            local = tp.indices if tp.kind == "sparse" else torch.arange(t.numel)
            flat_parts.append(local + t.row_start * (t.numel // t.shape[0]))
        if flat_parts:
            flat = torch.sort(torch.cat(flat_parts)).values
            if isinstance(host, TunedLinear) and t0.attr == "weight":
                host.set_sparse(flat)
            elif isinstance(host, TunedLinear):
                host.set_bias_delta(flat)
            else:
                host.set_delta(t0.attr, flat)
    setattr(model, PLAN_ATTR, plan)
    return model


def _host(model: nn.Module, t: LogicalTensor) -> TunedLinear | TunedLayerNorm:
    """The tuned replacement of the module owning `t` (created and swapped in on first use)."""
    module = model.get_submodule(t.module)
    if isinstance(module, (TunedLinear, TunedLayerNorm)):
        return module
    if isinstance(module, nn.Linear):
        if t.part:
            rows = module.out_features // 3
            tuned: nn.Module = TunedLinear(module, {"q": rows, "k": rows, "v": rows})
        else:
            tuned = TunedLinear(module, {WHOLE: module.out_features})
    elif isinstance(module, nn.LayerNorm):
        tuned = TunedLayerNorm(module)
    else:
        raise ValueError(f"{t.name}: partial tuning of a {type(module).__name__} is not supported; "
                         f"tune it whole (kind 'full') or leave it frozen")
    parent_name, _, child = t.module.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, tuned)
    return tuned


def merge_plan(model: nn.Module) -> nn.Module:
    """Fold sparse, vector and LoRA deltas into plain Linear / LayerNorm modules for inference (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (TunedLinear, TunedLayerNorm)):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.merged())
    return model


def trainable_parameters(model: nn.Module, *, include_head: bool = False) -> dict[str, nn.Parameter]:
    """Parameters that require grad, by name (head excluded unless asked)."""
    layout = ModelLayout.from_model(model) if not include_head else None
    head = set(layout.head_names) if layout else set()
    return {n: p for n, p in model.named_parameters() if p.requires_grad and n not in head}
