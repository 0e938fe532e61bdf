"""The measurements behind `bench/run.py`. Each function measures one figure side by side in this process
(or, for peak memory, one fresh subprocess per configuration) and returns plain JSON-able dicts.

Noise control: every ratio is taken per round between configurations measured back to back, configurations
are interleaved (their order rotates every round) and the reported ratio is the median over rounds.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPT_NO_PROGRESS", "1")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

LORA_TARGETS = ("q", "v")  # uniform LoRA on q and v of every block, as in LoRA and the SPT paper's LoRA-8
RELEASED = ("cifar", "0.4M", "lora")  # the SPT authors' allocation used for the SPT configuration


# ---- models and plans ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """The backbone of the step / memory figures: ViT-B/16 at 224 px, or a tiny ViT for the test mode."""

    tiny: bool = False
    num_classes: int = 100  # cifar (VTAB-1k) has 100 classes: the released plan's head
    drop_path_rate: float = 0.1  # SPT recipe

    @property
    def name(self) -> str:
        return "tiny-vit (32 px, patch 8, dim 64, depth 2)" if self.tiny else "vit_base_patch16_224"

    @property
    def img_size(self) -> int:
        return 32 if self.tiny else 224

    def build(self, device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
        import timm

        torch.manual_seed(seed)
        kwargs: dict[str, Any] = dict(pretrained=False, num_classes=self.num_classes,
                                      drop_path_rate=self.drop_path_rate)
        if self.tiny:
            kwargs.update(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
            name = "vit_tiny_patch16_224"
        else:
            name = "vit_base_patch16_224"
        with torch.device(device):
            return timm.create_model(name, **kwargs)

    def layout(self):
        from spt_core import ModelLayout

        return ModelLayout.from_model(self.build("meta"))

    @property
    def budget(self) -> int:
        """The parameter budget shared by the SPT plan and uniform LoRA (0.4M on ViT-B/16, same share on tiny)."""
        return 400_000 if not self.tiny else 2_000


# Log-normal sigmas of the synthetic map's factors: per tensor, per row, per column, per entry. Calibrated on
# the released plans (alpha 10, LoRA, median over the 19 tasks): at 0.4M the released plans have 13 structured
# matrices and 34k sparse entries, this map gives 16 and 37k; at 1.0M 43 and 14k, this map 49 and 19k. A
# per-tensor sigma of 1.5 (far more concentrated than the released plans: 17 / 20k at 0.4M) needs a 3.3x
# deeper ranking; see raw.ranking.calibration.
SYNTHETIC_SIGMAS = {"tensor": 0.75, "row": 1.0, "col": 1.0, "entry": 1.0}


def synthetic_sensitivity(layout, seed: int = 0, sigmas: dict[str, float] | None = None):
    """A heavy-tailed sensitivity map with a real map's structure: per-tensor scale x row x column x entry
    factors, all log-normal (squared gradients summed over a few samples are close to rank-structured)."""
    from spt_core import SensitivityMap

    sig = {**SYNTHETIC_SIGMAS, **(sigmas or {})}
    g = torch.Generator().manual_seed(seed)

    def lognormal(shape, sigma):
        return torch.exp(sigma * torch.randn(shape, generator=g))

    params: dict[str, torch.Tensor] = {}
    for t in layout.scored:
        shape = t.shape
        block = lognormal((), sig["tensor"]) * lognormal(shape, sig["entry"])
        if t.role == "matrix":
            block = block * lognormal((shape[0], 1), sig["row"]) * lognormal((1, shape[1]), sig["col"])
        rows = params.setdefault(t.param, [])
        rows.append((t.row_start, block.float()))
    scores = {p: torch.cat([b for _, b in sorted(blocks, key=lambda rb: rb[0])], 0) for p, blocks in params.items()}
    return SensitivityMap(scores, layout, {"synthetic": True, "seed": seed})


def build_plans(spec: ModelSpec, configs: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Plans by configuration name ("full", "lora", "spt") and a description of each."""
    from spt_core import allocate, full_finetune, rank_for_budget, released_plan, uniform_lora

    layout = spec.layout()
    plans, info = {}, {}
    for name in configs:
        if name == "full":
            plans[name] = full_finetune(layout)
            info[name] = {"plan": "full fine-tuning"}
        elif name == "lora":
            rank = rank_for_budget(layout, spec.budget, "lora", LORA_TARGETS)
            plans[name] = uniform_lora(layout, rank, LORA_TARGETS)
            info[name] = {"plan": f"uniform LoRA rank {rank} on {'+'.join(LORA_TARGETS)} of every block "
                                  f"(rank_for_budget at {spec.budget:,})", "rank": rank,
                          "targets": list(LORA_TARGETS)}
        elif name == "spt":
            if spec.tiny:
                plans[name] = allocate(synthetic_sensitivity(layout), spec.budget, structured="lora")
                info[name] = {"plan": f"spt-lora allocate() on a synthetic map at {spec.budget:,} (tiny mode: "
                                      "no released plan exists for the tiny ViT)", "source": "synthetic"}
            else:
                task, target, structured = RELEASED
                plans[name] = released_plan(task, target, structured, layout=layout)
                info[name] = {"plan": f"released SPT-{structured.upper()} allocation ({task}, {target})",
                              "source": "released", "task": task, "target": target}
        else:
            raise ValueError(f"unknown configuration {name!r}")
        p = plans[name]
        kinds: dict[str, int] = {}
        for tp in p.tensors.values():
            kinds[tp.kind] = kinds.get(tp.kind, 0) + 1
        info[name].update(trainable_params=p.trainable_params, tensors_by_kind=kinds)
    return plans, info


def make_batches(spec: ModelSpec, batch: int, n: int, device, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, spec.img_size, spec.img_size, generator=g)
        y = torch.randint(0, spec.num_classes, (batch,), generator=g)
        out.append((x.to(device), y.to(device)))
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autocast_ctx(device, amp: bool):
    if amp and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class Runner:
    """One model with a plan applied, its AdamW (spt_core's param groups) and a timed training step."""

    def __init__(self, spec: ModelSpec, plan, device, amp: bool, seed: int = 0):
        from spt_core import apply_plan
        from spt_core.train import param_groups

        self.device, self.amp = device, amp
        self.model = apply_plan(spec.build(device, seed), plan)
        self.model.train()
        self.optimizer = torch.optim.AdamW(param_groups(self.model, 1e-4), lr=1e-3)

    def step(self, x, y) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        with autocast_ctx(self.device, self.amp):
            loss = F.cross_entropy(self.model(x).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        sync(self.device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def eval_forward(self, x) -> float:
        self.model.eval()
        sync(self.device)
        t0 = time.perf_counter()
        with autocast_ctx(self.device, self.amp):
            self.model(x)
        sync(self.device)
        self.model.train()
        return time.perf_counter() - t0


def median(xs):
    return statistics.median(xs) if xs else None


# ---- 1. training step time, and sensitivity vs fine-tuning on the same model ----------------------------
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
    log(f"  warm-up done ({warmup} step(s) per configuration)")
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
    out: dict[str, Any] = {"batch": batch, "rounds": rounds, "warmup": warmup,
                           "step_s": times, "step_s_median": {n: median(times[n]) for n in names},
                           "step_cpu_s": cpu, "eval_forward_s": eval_s, "eval_forward_s_median": median(eval_s)}
    for other in ("lora", "full"):
        if "spt" in times and other in times:
            out[f"spt_vs_{other}_per_round"] = [a / b for a, b in zip(times["spt"], times[other])]
            out[f"spt_vs_{other}_cpu_time"] = median([a / b for a, b in zip(cpu["spt"], cpu[other])])
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


# ---- 2. peak memory, one fresh subprocess per configuration ----------------------------------------------
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
    runner = Runner(spec, plan, device, args["amp"])
    for _ in range(args["steps"]):
        runner.step(x, y)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        hwm = _rss_kb("VmHWM") if reset else None
        peak = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    model = runner.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"config": args["config"], "peak_bytes": int(peak - base), "baseline_bytes": int(base),
            "absolute_peak_bytes": int(peak), "method": method, "steps": args["steps"],
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "trainable_params_with_head": trainable,
            "saved_bytes_per_image": saved_activation_bytes(model, x[:1], y[:1], device, args["amp"])}


def saved_activation_bytes(model, x, y, device, amp: bool) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for the backward in one training forward
    (the activation memory a training step holds at its peak, per image when x holds one image)."""
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
    return int(sum(seen.values()))


# glibc malloc keeps freed blocks up to a dynamic threshold (growing to 32 MiB) in its heap instead of returning
# them to the OS, so a process's RSS also counts freed tensor memory. With a fixed 1 MiB mmap threshold every
# tensor of 1 MiB or more is mapped and unmapped on its own and the peak RSS follows the live tensors: the CPU
# analogue of torch.cuda.max_memory_allocated (which leaves out the caching allocator's reserve).
LIVE_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def measure_memory(spec: ModelSpec, configs: tuple[str, ...], *, batch: int, device, amp: bool, steps: int,
                   threads: int, log: Callable[[str], None], timeout: float = 900,
                   allocator: str = "live") -> dict[str, Any]:
    """One fresh subprocess per configuration. On a CPU they run at the same time (each one's peak RSS is
    its own; only memory is measured there), on CUDA one after the other. `allocator`: "live" (glibc with
    LIVE_ALLOCATOR_ENV: peak RSS ~ peak of live tensors) or "default" (glibc's defaults: what `top` shows)."""
    out: dict[str, Any] = {"batch": batch, "steps": steps, "allocator": allocator}
    parallel = torch.device(device).type != "cuda"
    env = {**os.environ, **(LIVE_ALLOCATOR_ENV if allocator == "live" else {})}
    if allocator != "live":
        for key in LIVE_ALLOCATOR_ENV:
            env.pop(key, None)

    def start(name):
        args = {"config": name, "tiny": spec.tiny, "device": str(device), "batch": batch, "amp": amp,
                "steps": steps, "threads": max(1, threads // len(configs)) if parallel else threads}
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT), env=env)

    def finish(name, proc):
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr = (stderr or "") + f"\ntimed out after {timeout:.0f} s"
        if proc.returncode != 0 or not stdout.strip():
            lines = (stderr or "").strip().splitlines()
            out[name] = {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
            log(f"  memory {name}: failed ({out[name]['error']})")
            return
        res = json.loads(stdout.strip().splitlines()[-1])
        out[name] = res
        log(f"  memory {name} ({allocator} allocator): {res['peak_bytes'] / 2**20:.0f} MiB")

    if parallel:
        procs = {name: start(name) for name in configs}
        for name, proc in procs.items():
            finish(name, proc)
    else:
        for name in configs:
            finish(name, start(name))
    return out


# ---- 3. sparse-delta gradient vs dense masked weight gradient --------------------------------------------
def measure_sparse_grad(*, d: int = 768, tokens: int = 1576, densities=(0.001, 0.01), rounds: int = 7,
                        device="cpu", log: Callable[[str], None]) -> dict[str, Any]:
    """One d x d matrix, `tokens` tokens. Gradient of the K selected entries: our SDDMM path (sampled_grad on
    the CSR pattern, what SparseDeltaLinear's backward runs) vs the naive path (dense G^T X, then gather the
    K entries). Also the whole layer backward (grad_x + entry gradients) vs a dense trainable weight."""
    from spt_core.modules.sparse import csr_pattern, sampled_grad, sparse_delta_linear

    g = torch.Generator().manual_seed(0)
    G = torch.randn(tokens, d, generator=g).to(device)
    X = torch.randn(tokens, d, generator=g).to(device)
    W = torch.randn(d, d, generator=g).to(device) * 0.02
    out: dict[str, Any] = {"d": d, "tokens": tokens, "rounds": rounds}

    def timeit(fn, reps: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / reps

    for density in densities:
        k = max(1, round(density * d * d))
        flat = torch.sort(torch.randperm(d * d, generator=g)[:k]).values.to(device)
        rows, cols = flat // d, flat % d
        pattern = csr_pattern(rows, cols, (d, d))
        delta = torch.zeros(k, device=device, requires_grad=True)
        xg = X.clone().requires_grad_()
        w_dense = W.clone().requires_grad_()
        mask = torch.zeros(d, d, device=device)
        mask[rows, cols] = 1

        fns = {
            "sddmm": lambda: sampled_grad(G, X, rows, cols, pattern),
            "dense_masked": lambda: (G.t() @ X)[rows, cols],
            "sparse_layer_backward": lambda: torch.autograd.grad(
                sparse_delta_linear(xg, W, None, delta, rows, cols, pattern), (xg, delta), G),
            "dense_layer_backward": lambda: [gr if i == 0 else gr * mask for i, gr in enumerate(torch.autograd.grad(
                F.linear(xg, w_dense), (xg, w_dense), G))],
        }
        torch.testing.assert_close(fns["sddmm"](), fns["dense_masked"](), rtol=1e-3, atol=1e-2)
        # reps per timing so that one measurement lasts ~20 ms or more
        reps = {n: max(1, min(50, math.ceil(0.02 / max(1e-6, timeit(f, 1))))) for n, f in fns.items()}
        samples: dict[str, list[float]] = {n: [] for n in fns}
        names = list(fns)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                samples[n].append(timeit(fns[n], reps[n]))
        ratios = [a / b for a, b in zip(samples["sddmm"], samples["dense_masked"])]
        layer = [a / b for a, b in zip(samples["sparse_layer_backward"], samples["dense_layer_backward"])]
        key = f"{density * 100:g}%"
        out[key] = {"k": k, "s_median": {n: median(v) for n, v in samples.items()},
                    "ratio": median(ratios), "ratio_per_round": ratios, "layer_backward_ratio": median(layer)}
        log(f"  sparse grad at {key} (K={k}): SDDMM {median(samples['sddmm']) * 1e3:.2f} ms vs dense masked "
            f"{median(samples['dense_masked']) * 1e3:.2f} ms -> {median(ratios):.3f}")
    return out


# ---- 4. ranking bytes a trial pulls vs the full map --------------------------------------------------------
def measure_ranking_bytes(spec: ModelSpec, *, max_budget: int | None = None, alphas=(2.0, 40.0), ranks=(8,),
                          log: Callable[[str], None]) -> dict[str, Any]:
    """A synthetic heavy-tailed map of the backbone; the ranking the sweep's store would put in the object
    store for a search space reaching `max_budget` (LoRA and Adapter, alpha over `alphas`, `ranks`)."""
    layout = spec.layout()
    max_budget = max_budget or (1_000_000 if not spec.tiny else 5_000)
    t0 = time.perf_counter()
    smap = synthetic_sensitivity(layout)
    gen_s = time.perf_counter() - t0
    space = {"methods": ["spt-lora", "spt-adapter"], "budget": [min(5e4, max_budget / 20), max_budget],
             "budget_unit": "params", "alpha": list(alphas), "rank": list(ranks)}
    t0 = time.perf_counter()
    from spt_ray.rankings import derive_ranking, map_stream  # no Ray needed: runs on the GPU machine too
    from spt_ray.space import RankingNeeds, SearchSpace

    needs = RankingNeeds(SearchSpace.from_dict(space))
    ranking, _ = derive_ranking(map_stream(smap), smap.layout, needs.depths(smap.layout))
    derive_s = time.perf_counter() - t0
    nbytes = ranking.compact().nbytes
    full = 4 * smap.num_entries
    calibration = _calibration(spec, ranking, space, log) if not spec.tiny else None
    log(f"  ranking: k={ranking.ids.numel():,} -> {nbytes / 2**20:.1f} MiB of {full / 2**20:.0f} MiB = "
        f"{nbytes / full:.4f}")
    return {"fraction": nbytes / full, "ranking_bytes": nbytes, "full_map_bytes": full,
            "num_entries": smap.num_entries, "k": int(ranking.ids.numel()), "margin": needs.margin,
            "space": space, "via": "spt_ray.rankings.derive_ranking (each tensor's top entries to its deepest "
            "switch threshold)", "bytes_per_entry": nbytes / max(1, ranking.ids.numel()),
            "synthetic_map_s": gen_s, "derive_s": derive_s, "synthetic_sigmas": dict(SYNTHETIC_SIGMAS),
            "calibration": calibration}


def _calibration(spec: ModelSpec, ranking, space, log) -> dict[str, Any]:
    """Per corner, how deep the allocation reaches (entries of the kept ranking), and the synthetic map's alpha-10
    LoRA plans next to the released plans' medians (how realistic the map's concentration is)."""
    from spt_core import allocate

    out: dict[str, Any] = {"corner_k": {}}
    lo, hi = space["alpha"]
    for structured in ("lora", "adapter"):
        for alpha in (lo, (lo * hi) ** 0.5, hi):
            plan = allocate(ranking, int(space["budget"][1]), structured=structured, alpha=alpha)
            out["corner_k"][f"{structured} alpha {alpha:.3g}"] = plan.meta["num_top_entries"]
    try:
        import statistics as st

        from spt_core.released import released_allocation, released_index

        for target in (0.4, 1.0):
            plan = allocate(ranking, int(target * 1e6), structured="lora", alpha=10.0)
            rel = [released_allocation(t, m, s) for s, t, m in released_index() if s == "lora" and m == target]
            out[f"lora_alpha10_{target}M"] = {
                "synthetic": {"structured": len(plan.of_kind("lora")), "sparse": int(sum(
                    tp.indices.numel() for tp in plan.tensors.values() if tp.kind == "sparse"))},
                "released_median": {"structured": st.median(sum(map(sum, a.tuned_matrices)) for a in rel),
                                    "sparse": st.median(a.sparse_params for a in rel)}}
    except (ImportError, ValueError) as err:
        out["released"] = f"released allocations not available: {err}"
    log(f"  ranking depth per corner: {out['corner_k']}")
    return out


# ---- 5. sweep overhead (spt_ray run_sweep on the mini smoke recipe), in a subprocess -----------------------
def measure_sweep_overhead(*, timeout: float, log: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="spt-bench-sweep-") as tmp:
        proc = None
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--sweep-worker", tmp],
                                  capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                                  env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                                       "RAY_TMPDIR": f"/tmp/sptb{os.getpid()}"})
        except subprocess.TimeoutExpired:
            return {"share": None, "reason": f"the smoke sweep did not finish within {timeout:.0f} s"}
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"share": None, "reason": "spt_ray sweep engine failed: " + " | ".join(tail)[-600:]}
        res = json.loads(lines[-1])
        log(f"  sweep: wall {res['overhead']['wall_s']:.1f} s, busy {res['overhead']['busy_s']:.1f} s, "
            f"share {res['overhead']['share']:.3f}")
        return {"share": res["overhead"]["share"], **res}


def sweep_worker(tmp: str) -> dict[str, Any]:
    """Runs in a fresh process: the mini smoke recipe end to end through spt_ray.run_sweep."""
    t_start = time.perf_counter()
    from spt_core.data.mini import write_mini_suite
    from spt_core.embedded import EMBEDDED_WEIGHTS, build_embedded_vit
    from spt_ray import SweepSpec, run_sweep
    from spt_ray.suites import recipe

    rec = recipe("mini", smoke=True)
    data_root = Path(tmp) / "data"
    t0 = time.perf_counter()
    write_mini_suite(data_root, seed=0, tasks=list(rec["tasks"]))
    data_s = time.perf_counter() - t0
    backbone = dict(rec["backbone"])
    if not EMBEDDED_WEIGHTS.is_file():  # no shipped weights: the same architecture with seeded random weights
        from safetensors.torch import save_file

        torch.manual_seed(0)
        path = Path(tmp) / "spt_mini_vit_random.safetensors"
        save_file({k: v.contiguous() for k, v in build_embedded_vit(10).state_dict().items()}, str(path))
        backbone["weights"] = str(path)
    spec = SweepSpec.from_dict({**rec, "data_root": str(data_root), "storage": str(Path(tmp) / "storage"),
                                "backbone": backbone, "address": "local"})
    t0 = time.perf_counter()
    result = run_sweep(spec)
    return {"overhead": result.overhead, "trials": result.trials, "recipe": "mini smoke",
            "tasks": list(spec.tasks), "num_samples": spec.num_samples, "baselines": list(spec.baselines),
            "epochs": spec.train.epochs, "sweep_s": time.perf_counter() - t0, "data_generation_s": data_s,
            "process_s": time.perf_counter() - t_start}


# ---- 6. DuckDB query over 1M result rows ------------------------------------------------------------------
def measure_results_query(*, rows: int = 1_000_000, tasks: int = 19, files_per_task: int = 4, repeats: int = 5,
                          log: Callable[[str], None]) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spt_ray.results import FILE_SCHEMA, duckdb_connect

    rng = np.random.default_rng(0)
    methods = np.array(["spt-lora", "spt-adapter", "linear", "full", "bitfit", "lora", "adapter"])
    with tempfile.TemporaryDirectory(prefix="spt-bench-results-") as tmp:
        t0 = time.perf_counter()
        per_task = rows // tasks
        written = 0
        for ti in range(tasks):
            n_task = per_task + (1 if ti < rows - per_task * tasks else 0)
            for fi, idx in enumerate(np.array_split(np.arange(written, written + n_task), files_per_task)):
                n = idx.size
                cols: dict[str, Any] = {}
                for field in FILE_SCHEMA:
                    cols[field.name] = pa.nulls(n, field.type)
                cols["row_id"] = pa.array([f"{i:024x}" for i in idx], pa.string())
                cols["phase"] = pa.array(np.where(rng.random(n) < 0.9, "search", "final"))
                cols["row_kind"] = pa.array(np.where(rng.random(n) < 0.95, "report", "trial"))
                cols["trial_id"] = pa.array([f"t{i // 100:08d}" for i in idx])
                cols["method"] = pa.array(methods[rng.integers(0, len(methods), n)])
                cols["epoch"] = pa.array(rng.integers(1, 101, n).astype(np.int32))
                cols["val_acc"] = pa.array(rng.random(n))
                cols["val_loss"] = pa.array(rng.random(n) * 3)
                cols["budget"] = pa.array(rng.integers(50_000, 1_000_000, n))
                cols["trainable_params"] = pa.array(rng.integers(50_000, 1_000_000, n))
                cols["train_s"] = pa.array(rng.random(n) * 30)
                cols["status"] = pa.array(np.full(n, "completed"))
                cols["created_at"] = pa.array((1.7e15 + idx).astype("int64"), pa.timestamp("us", tz="UTC"))
                table = pa.table([cols[f.name] for f in FILE_SCHEMA], schema=FILE_SCHEMA)
                d = Path(tmp) / "results" / "sweep=bench" / f"task=task{ti:02d}"
                d.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, d / f"part-{fi:03d}.parquet")
            written += n_task
        gen_s = time.perf_counter() - t0
        con = duckdb_connect(tmp, "bench")
        query = ("SELECT task, method, count(*) AS n, avg(val_acc) AS mean_val_acc, max(val_acc) AS best_val_acc "
                 "FROM results GROUP BY task, method")
        times, result = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = con.execute(query).fetchall()
            times.append(time.perf_counter() - t0)
        # the same aggregate straight on the files, without the view's row_id deduplication
        glob = f"{tmp}/results/sweep=bench/task=*/*.parquet"
        raw_query = (f"SELECT task, method, count(*), avg(val_acc), max(val_acc) FROM read_parquet('{glob}', "
                     "hive_partitioning=true) GROUP BY task, method")
        raw = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            con.execute(raw_query).fetchall()
            raw.append(time.perf_counter() - t0)
        total = sum(r[2] for r in result)
        threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    import duckdb

    log(f"  results query: {median(times):.3f} s median over {repeats} ({total:,} rows, {len(result)} groups; "
        f"without the dedup view {median(raw):.3f} s)")
    return {"s": median(times), "s_all": times, "first_s": times[0], "rows": total, "groups": len(result),
            "files": tasks * files_per_task, "generate_s": gen_s, "no_dedup_s": median(raw),
            "duckdb_version": duckdb.__version__, "duckdb_threads": threads, "query": query}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        print(json.dumps(memory_worker(json.loads(sys.argv[2]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "--sweep-worker":
        print(json.dumps(sweep_worker(sys.argv[2]), default=str))
    else:
        sys.exit("internal worker entry point; run bench/run.py")
