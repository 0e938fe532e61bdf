"""Peak memory of each configuration, one fresh subprocess each."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from .common import ROOT, WORKER, ModelSpec, Runner, autocast_ctx, build_plans, make_batches

# The ops of a ViT step that do its arithmetic: the products, the attention kernel, the patch convolution.
_aten = torch.ops.aten
_PRODUCTS = frozenset({
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten.convolution.default, _aten.convolution_backward.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward.default})


class SkipProducts(TorchDispatchMode):
    """Inside it every op of _PRODUCTS returns zero-filled tensors of the shape, dtype and strides its kernel
    would write (from the op's meta kernel); every other op runs. A step then allocates and frees the same
    tensors in the same order as when computed (tests/test_bench.py compares the two op by op), and zero-filling
    touches each page as a kernel writing its output does, so the peak RSS counts the same tensors (not what
    the kernels hold besides: 33 MiB of full fine-tuning's 1.5 GB at batch 2, bench/memory_skip_check.json),
    without the products' time: on a CPU without native bf16 (AVX2 only) torch's bf16 matmul of a 768 x 768
    weight by 1,576 tokens took 0.13 s, 1.7 s in the input gradient's layout, against 0.02 s in fp32, so one
    batch-64 step of ViT-B/16 would take tens of minutes (estimated)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _PRODUCTS:
            return func(*args, **kwargs)
        to_meta = partial(tree_map_only, torch.Tensor, lambda t: t.to("meta"))
        shapes = func(*to_meta(args), **to_meta(kwargs))
        return tree_map_only(torch.Tensor, lambda m: torch.empty_strided(
            m.shape, m.stride(), dtype=m.dtype, device=args[0].device).zero_(), shapes)


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process: Linux clear_refs, value 5."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_worker(args: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: plan built on a meta model, then baseline, model, surgery, steps, peak."""
    import resource

    torch.set_num_threads(int(args["threads"]))
    spec = ModelSpec(tiny=args["tiny"])
    device = args["device"]
    plans, _ = build_plans(spec, (args["config"],))
    plan = plans[args["config"]]
    x, y = make_batches(spec, args["batch"], 1, device)[0]
    gc.collect()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        method = "torch.cuda.max_memory_allocated() minus memory_allocated() before the model is built"
    else:
        reset = _reset_peak_rss()
        base = (_rss_kb("VmRSS") or 0) * 1024
        method = ("peak RSS (VmHWM, reset via /proc/self/clear_refs after imports and plan building) minus "
                  "the RSS at that point" if reset else
                  "ru_maxrss (process lifetime peak) minus the RSS after imports and plan building")
        live = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        method += (f", glibc MALLOC_MMAP_THRESHOLD_={live} (freed tensors leave the RSS)" if live else
                   ", glibc default allocator settings (RSS includes freed heap blocks)")
    skip = not cuda and args.get("skip_products", True)  # False: computed, to check the two agree
    if skip:
        method += "; matrix products, attention and convolutions not computed (SkipProducts: same tensors)"
    runner = Runner(spec, plan, device, args["amp"], grad_checkpointing=bool(args.get("grad_checkpointing")))
    with SkipProducts() if skip else nullcontext():
        for _ in range(args["steps"]):
            runner.step(x, y)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        hwm = _rss_kb("VmHWM") if reset else None
        peak = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    model = runner.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with SkipProducts() if skip else nullcontext():
        activation = activation_bytes_per_image(runner.model, x[:1], y[:1], device, args["amp"])
    return {"config": args["config"], "batch": args["batch"], "peak_bytes": int(peak - base),
            "baseline_bytes": int(base), "grad_checkpointing": bool(args.get("grad_checkpointing")),
            "products_computed": not skip,
            "absolute_peak_bytes": int(peak), "method": method, "steps": args["steps"],
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "trainable_params_with_head": trainable,
            **activation}


def activation_bytes_per_image(model, x, y, device, amp: bool) -> dict[str, int]:
    """What one image adds to the peak, from tensor bytes (deterministic, unlike RSS at small batches): the
    difference between a two-image and a one-image forward, so what a step saves whatever the batch (autocast's
    weight casts, merged weight copies) is left out of the slope and reported as `saved_fixed_bytes`.

    Without checkpointing: the bytes autograd saves for the backward. With it: what stays saved outside the
    checkpointed blocks, plus every block's input (checkpointing keeps those), plus one block's saved bytes
    (recomputed in the backward, one block at a time; taken as the whole model's over the depth)."""
    one = x[:1].clone(), y[:1].clone()  # a view of a batch would count the whole batch's storage
    two = one[0].repeat(2, *([1] * (x.dim() - 1))), one[1].repeat(2)
    plain = {n: _saved_bytes(model, *b, device, amp, checkpointing=False) for n, b in ((1, one), (2, two))}
    kept = {n: _saved_bytes(model, *b, device, amp, checkpointing=True) for n, b in ((1, one), (2, two))}
    per_image = plain[2] - plain[1]
    return {"saved_bytes_per_image": per_image, "saved_fixed_bytes": max(0, plain[1] - per_image),
            "checkpointed_bytes_per_image": kept[2] - kept[1] + per_image // max(1, len(getattr(model, "blocks", [])))}


def _saved_bytes(model, x, y, device, amp: bool, *, checkpointing: bool) -> int:
    """Bytes autograd saves in one training forward; with checkpointing, plus every block's input, each storage
    once (a checkpoint that keeps its input through autograd, as the reentrant one does, shows it to the hook)."""
    inputs: dict[int, int] = {}
    blocks = list(getattr(model, "blocks", [])) if checkpointing else []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.update(_storage_bytes(a[0]))) for b in blocks]
    try:
        model.set_grad_checkpointing(checkpointing)
        saved = saved_storages(model, x, y, device, amp)
    finally:
        model.set_grad_checkpointing(False)
        for h in hooks:
            h.remove()
    return sum({**inputs, **saved}.values())


def _storage_bytes(t: torch.Tensor) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()}


def saved_storages(model, x, y, device, amp: bool) -> dict[int, int]:
    """Bytes by storage of the distinct non-parameter tensors autograd saves for the backward in one training
    forward (the activation memory a training step holds at its peak, per image when x holds one image)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            if key not in params:
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_ctx(device, amp):
        loss = F.cross_entropy(model(x).float(), y)
    del loss
    return seen


# glibc malloc keeps freed blocks up to a dynamic threshold (growing to 32 MiB) in its heap instead of returning
# them to the OS, so a process's RSS also counts freed tensor memory. With a fixed 1 MiB mmap threshold every
# tensor of 1 MiB or more is mapped and unmapped on its own and the peak RSS follows the live tensors: the CPU
# analogue of torch.cuda.max_memory_allocated (which leaves out the caching allocator's reserve).
LIVE_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def measure_memory(spec: ModelSpec, configs: tuple[str, ...], *, batches: tuple[int, ...], device, amp: bool,
                   steps: int, threads: int, grad_checkpointing: bool, log: Callable[[str], None],
                   timeout: float = 900) -> dict[str, Any]:
    """Peak memory of every configuration at every batch size, one fresh subprocess each (on a CPU the
    configurations of one batch run at the same time: each one's peak RSS is its own; on CUDA one after the
    other), with the live-tensor allocator setting (LIVE_ALLOCATOR_ENV); `project` extends the largest batch's
    peak to batch 64 with the bytes one image adds: what a CPU cannot run in the benchmark's time is
    extrapolated from what it ran."""
    out: dict[str, Any] = {"batches": list(batches), "steps": steps, "grad_checkpointing": grad_checkpointing,
                           "runs": {name: {} for name in configs}}
    parallel = torch.device(device).type != "cuda"
    env = {**os.environ, **LIVE_ALLOCATOR_ENV}

    def start(name, batch):
        args = {"config": name, "tiny": spec.tiny, "device": str(device), "batch": batch, "amp": amp,
                "steps": steps, "threads": max(1, threads // len(configs)) if parallel else threads,
                "grad_checkpointing": grad_checkpointing}
        return subprocess.Popen([sys.executable, str(WORKER), "memory", json.dumps(args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT), env=env)

    def finish(name, batch, proc):
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr = (stderr or "") + f"\ntimed out after {timeout:.0f} s"
        if proc.returncode != 0 or not stdout.strip():
            lines = (stderr or "").strip().splitlines()
            out["runs"][name][batch] = {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
            log(f"  memory {name} batch {batch}: failed ({out['runs'][name][batch]['error']})")
            return
        out["runs"][name][batch] = json.loads(stdout.strip().splitlines()[-1])
        log(f"  memory {name} batch {batch}: {out['runs'][name][batch]['peak_bytes'] / 2**20:.0f} MiB")

    for batch in batches:
        if parallel:
            procs = {name: start(name, batch) for name in configs}
            for name, proc in procs.items():
                finish(name, batch, proc)
        else:
            for name in configs:
                finish(name, batch, start(name, batch))
    out.update(project(out["runs"], batches))
    out["without_checkpointing"] = saved_bytes_projection(out["runs"], max(batches))
    return out


def project(runs: dict[str, dict[int, dict[str, Any]]], batches: tuple[int, ...], target: int = 64) -> dict[str, Any]:
    """Per configuration: the peak measured at the largest batch, plus (target - batch) x the bytes one image
    adds (tensor bytes, `activation_bytes_per_image`: with or without checkpointing, as the run was). RSS
    differences between small batches are within the allocator's noise, so the slope is not fitted from
    them; the smaller batches' peaks stay in `runs` as a check."""
    hi = max(batches)
    fit: dict[str, Any] = {}
    for name, by_batch in runs.items():
        m = by_batch.get(hi) or {}
        if not m.get("peak_bytes"):
            continue
        per_image = m.get("checkpointed_bytes_per_image" if m.get("grad_checkpointing") else "saved_bytes_per_image")
        fit[name] = {"measured_batch": hi, "peak_mib": m["peak_bytes"] / 2**20,
                     "per_image_mib": None if per_image is None else per_image / 2**20}
        fit[name][f"at_{target}_mib"] = (fit[name]["peak_mib"] if hi == target else None if per_image is None else
                                         fit[name]["peak_mib"] + (target - hi) * fit[name]["per_image_mib"])
    ratios: dict[str, Any] = {"fit": fit}
    for other in ("full", "lora"):
        if "spt" in fit and other in fit:
            ratios[f"spt_vs_{other}_measured"] = fit["spt"]["peak_mib"] / fit[other]["peak_mib"]
            at = fit["spt"][f"at_{target}_mib"], fit[other][f"at_{target}_mib"]
            ratios[f"spt_vs_{other}_at_{target}"] = at[0] / at[1] if all(at) else None
    return ratios


def saved_bytes_projection(runs: dict[str, dict[int, dict[str, Any]]], batch: int) -> dict[str, Any] | None:
    """Without checkpointing, for context: fixed = parameters + 12 bytes per trainable parameter (gradient and
    two AdamW moments) + what a step saves whatever the batch, activations = batch x the bytes autograd saves per
    image (saved-tensor hook)."""
    cfg = {}
    for name, by_batch in runs.items():
        m = by_batch.get(batch) or {}
        if not m.get("saved_bytes_per_image"):
            return None
        fixed = m["param_bytes"] + 12 * m["trainable_params_with_head"] + m.get("saved_fixed_bytes", 0)
        cfg[name] = {"fixed_mib": fixed / 2**20,
                     "saved_mib_per_image": m["saved_bytes_per_image"] / 2**20}
    if "spt" not in cfg or "full" not in cfg:
        return {"configs": cfg}

    def at(name: str, b: int) -> float:
        return cfg[name]["fixed_mib"] + b * cfg[name]["saved_mib_per_image"]

    return {"configs": cfg, "spt_vs_full_at_64": at("spt", 64) / at("full", 64)}
