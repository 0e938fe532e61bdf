"""What every figure shares: the backbone spec, plans, batches, a timed training step, the synthetic map.

Noise control, for every figure: each ratio is taken per round between configurations measured back to back,
configurations are interleaved (their order rotates every round) and the reported ratio is the median over
rounds.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "worker.py"  # fresh subprocesses (memory, sweep) start here
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
        elif name in ("spt", "spt_adapter"):
            structured = "lora" if name == "spt" else "adapter"
            if spec.tiny:
                plans[name] = allocate(synthetic_sensitivity(layout), spec.budget, structured=structured)
                info[name] = {"plan": f"spt-{structured} allocate() on a synthetic map at {spec.budget:,} (tiny "
                                      "mode: no released plan exists for the tiny ViT)", "source": "synthetic"}
            else:
                task, target, _ = RELEASED
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
    """bf16 autocast on the device when `amp` (the VTAB recipe's setting), else nothing."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if amp else nullcontext()


class Runner:
    """One model with a plan applied, its AdamW as the Trainer makes it, and a timed training step."""

    def __init__(self, spec: ModelSpec, plan, device, amp: bool, seed: int = 0, grad_checkpointing: bool = False):
        from spt_core import apply_plan
        from spt_core.train import enable_grad_checkpointing, make_optimizer

        self.device, self.amp = device, amp
        self.model = apply_plan(spec.build(device, seed), plan)
        if grad_checkpointing:
            enable_grad_checkpointing(self.model)
        self.model.train()
        self.optimizer = make_optimizer(self.model, 1e-3, 1e-4)

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


# Ops that only describe, allocate or view memory: no kernel of their own on a GPU.
_NO_KERNEL = {"view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "slice",
              "select", "narrow", "split", "split_with_sizes", "unbind", "unsqueeze", "squeeze", "as_strided",
              "alias", "detach", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
              "new_empty_strided", "item", "_local_scalar_dense", "is_same_size", "sym_size", "sym_stride",
              "promote_types", "values", "_record_function_enter_new", "_record_function_exit"}


def ops_per_call(fn) -> int:
    """How many aten ops that compute something (one or more GPU kernels each) one call of `fn` dispatches:
    where a GPU step is short, each costs a launch, so this counts fixed per-step work a CPU can see."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _NO_KERNEL:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n

