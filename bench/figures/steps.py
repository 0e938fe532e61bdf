"""Training step time of each configuration, and the sensitivity pass vs one forward+backward."""

from __future__ import annotations

import gc
import time
from typing import Any, Callable

import torch
from torch.nn import functional as F

from .common import ModelSpec, Runner, make_batches, median, ops_per_call, sync



def measure_steps(spec: ModelSpec, plans: dict[str, Any], *, batch: int, rounds: int, warmup: int, device,
                  amp: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Interleaved training steps of every configuration (the order rotates each round) and one eval forward of
    the SPT model per round. Wall time (after a device sync) and, on a CPU, this process's CPU time too."""
    names = list(plans)
    runners = {n: Runner(spec, plans[n], device, amp) for n in names}
    x, y = make_batches(spec, batch, 1, device)[0]
    for n in names:
        for _ in range(warmup):
            runners[n].step(x, y)
    ops = {n: ops_per_call(lambda: runners[n].step(x, y)) for n in names}
    log(f"  warm-up done ({warmup} step(s) per configuration); aten ops per step: {ops}")
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    eval_s: list[float] = []
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            c0 = time.process_time()
            times[n].append(runners[n].step(x, y))
            cpu[n].append(time.process_time() - c0)
        if "spt" in runners:
            eval_s.append(runners["spt"].eval_forward(x))
        log("  round %d/%d: %s" % (r + 1, rounds, ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names)))
    del runners
    gc.collect()
    out: dict[str, Any] = {"batch": batch, "rounds": rounds, "warmup": warmup, "ops_per_step": ops,
                           "step_s": times, "step_s_median": {n: median(times[n]) for n in names},
                           "step_cpu_s": cpu, "eval_forward_s": eval_s, "eval_forward_s_median": median(eval_s)}
    for other in ("lora", "full"):
        if "spt" in times and other in times:
            out[f"spt_vs_{other}_per_round"] = [a / b for a, b in zip(times["spt"], times[other])]
            out[f"spt_vs_{other}_cpu_per_round"] = [a / b for a, b in zip(cpu["spt"], cpu[other])]
            out[f"spt_vs_{other}_cpu_time"] = median(out[f"spt_vs_{other}_cpu_per_round"])
    return out


def measure_sensitivity(spec: ModelSpec, full_plan, *, batch: int, batches: int, rounds: int, device,
                        log: Callable[[str], None]) -> dict[str, Any]:
    """compute_sensitivity vs full fine-tuning forward+backward on one model (every parameter trainable) and the
    same `batches` batches, fp32 (the reference computes sensitivity in fp32), train mode, alternating order."""
    from spt_core import compute_sensitivity

    model = Runner(spec, full_plan, device, amp=False).model
    data = make_batches(spec, batch, batches, device, seed=2)

    def sensitivity() -> float:
        sync(device)
        t0 = time.perf_counter()
        compute_sensitivity(model, data, progress=False)
        sync(device)
        return (time.perf_counter() - t0) / len(data)

    def fwd_bwd() -> float:
        sync(device)
        t0 = time.perf_counter()
        for bx, by in data:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(bx), by).backward()
        sync(device)
        model.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / len(data)

    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    sens, fb = [], []
    for r in range(rounds):
        pair = (sensitivity, fwd_bwd) if r % 2 == 0 else (fwd_bwd, sensitivity)
        res = {f.__name__: f() for f in pair}
        sens.append(res["sensitivity"])
        fb.append(res["fwd_bwd"])
        log(f"  sensitivity round {r + 1}/{rounds}: {sens[-1]:.3f} s/batch vs full fwd+bwd {fb[-1]:.3f} s/batch")
    del model
    gc.collect()
    return {"batch": batch, "batches": batches, "rounds": rounds, "sensitivity_s_per_batch": sens,
            "full_fwd_bwd_s_per_batch": fb, "ratio_per_round": [a / b for a, b in zip(sens, fb)],
            "ratio": median([a / b for a, b in zip(sens, fb)])}
