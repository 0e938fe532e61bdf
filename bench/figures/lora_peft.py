"""Uniform LoRA step time against Hugging Face PEFT's LoRA at the same trainable parameters.

timm's ViT computes q, k and v with one fused `qkv` Linear, which PEFT can only adapt whole: rank r on qkv has
r x (d + 3d) parameters, exactly those of rank r on q and v separately (2 x r x (d + d)). So PEFT's rank-r LoRA
on `qkv` is the equal-parameter counterpart of spt_core's uniform rank-r LoRA on q and v; both train the head,
use the same dropout on the branch input, and run the same AdamW. peft is a bench extra
(`pip install .[bench]`); without it the figure is skipped with a note.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable

import torch
from torch.nn import functional as F

from .common import autocast_ctx, median, ops_per_call, sync


def peft_available() -> str | None:
    """None when peft imports, else why not (the note the benchmark records)."""
    try:
        import peft  # noqa: F401
    except ImportError as err:
        return f"peft is not installed ({err}); pip install '.[bench]' to measure lora_vs_peft_step_time"
    return None


def measure_lora_vs_peft(*, arch: str, img_size: int, batch: int, rank: int, rounds: int, warmup: int, device,
                         amp: bool, log: Callable[[str], None], model_kwargs: dict[str, Any] | None = None,
                         num_classes: int = 100) -> dict[str, Any]:
    """Interleaved training steps (order alternating per round) of the two LoRA implementations on `arch`."""
    import timm
    from peft import LoraConfig, get_peft_model

    from spt_core import ModelLayout, apply_plan, uniform_lora
    from spt_core.train import make_optimizer

    def build():
        torch.manual_seed(0)
        with torch.device(device):
            return timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=img_size,
                                     **(model_kwargs or {}))

    base = build()
    plan = uniform_lora(ModelLayout.from_model(base), rank, ("q", "v"))
    ours = apply_plan(base, plan)
    peft_model = get_peft_model(build(), LoraConfig(r=rank, lora_alpha=rank, lora_dropout=plan.lora_dropout,
                                                    target_modules=["qkv"], modules_to_save=["head"]))
    models = {"spt_core": ours, "peft": peft_model}
    params = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()}
    opts = {n: make_optimizer(m, 1e-3, 1e-4) for n, m in models.items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, img_size, img_size, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)

    cpu: dict[str, list[float]] = {n: [] for n in models}

    def step(name: str) -> float:
        model, opt = models[name], opts[name]
        model.train()
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast_ctx(device, amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        cpu[name].append(time.process_time() - c0)
        return time.perf_counter() - t0

    for name in models:
        for _ in range(warmup):
            step(name)
    ops = {name: ops_per_call(lambda: step(name)) for name in models}
    for name in models:
        cpu[name].clear()
    times: dict[str, list[float]] = {n: [] for n in models}
    for r in range(rounds):
        for name in (("spt_core", "peft") if r % 2 == 0 else ("peft", "spt_core")):
            times[name].append(step(name))
    ratios = [a / b for a, b in zip(times["spt_core"], times["peft"])]
    cpu_ratios = [a / b for a, b in zip(cpu["spt_core"], cpu["peft"])]
    del models, opts, ours, peft_model
    gc.collect()
    import peft

    log(f"  LoRA r{rank} on {arch}, batch {batch}: spt_core {median(times['spt_core']):.3f} s vs PEFT "
        f"{median(times['peft']):.3f} s -> {median(ratios):.3f} ({params['spt_core']:,} vs {params['peft']:,} "
        f"trainable; aten ops per step {ops['spt_core']} vs {ops['peft']})")
    return {"ratio": median(ratios), "ratio_per_round": ratios, "cpu_time_ratio": median(cpu_ratios),
            "cpu_time_ratio_per_round": cpu_ratios, "step_s": times,
            "step_s_median": {n: median(v) for n, v in times.items()}, "trainable_params": params, "ops_per_step": ops,
            "arch": arch, "img_size": img_size, "batch": batch, "rank": rank, "rounds": rounds,
            "lora_dropout": plan.lora_dropout, "lora_drop_path": plan.lora_drop_path, "peft": peft.__version__,
            "peft_targets": ["qkv"], "spt_core_targets": ["q", "v"]}
