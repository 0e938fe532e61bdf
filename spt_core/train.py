"""Training and evaluation with the SPT recipe (AdamW, cosine schedule with warm-up), resumable per epoch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .checks import check_fields
from .progress import progress_bar

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainConfig:
    """The reference VTAB-1k recipe by default (REFERENCE.md section 1)."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 10
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    amp: bool = False  # bf16 autocast, CUDA only
    # Recompute each transformer block's activations in the backward instead of keeping them (timm's
    # set_grad_checkpointing): ~30% more compute for a fraction of the activation memory, which is what
    # dominates a PEFT plan's peak at batch 64 (README: Benchmarks). Needs a model with set_grad_checkpointing.
    grad_checkpointing: bool = False
    seed: int = 42
    device: str = "auto"

    def __post_init__(self) -> None:
        check_fields(self)  # types first: "3" or NaN would pass (or crash) the range checks below
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.warmup_epochs < 0 or self.warmup_lr < 0 or self.min_lr < 0:
            raise ValueError(f"warmup_epochs, warmup_lr and min_lr must be >= 0, got {self.warmup_epochs}, "
                             f"{self.warmup_lr}, {self.min_lr}")
        if not 0 <= self.label_smoothing < 1 or (self.grad_clip is not None and self.grad_clip < 0):
            raise ValueError(f"label_smoothing must be in [0, 1) and grad_clip >= 0 (or null), got "
                             f"{self.label_smoothing}, {self.grad_clip}")
        self.warmup_epochs = min(self.warmup_epochs, self.epochs - 1)  # a short run still gets a cosine phase

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_at(cfg: TrainConfig, epoch: float) -> float:
    """Linear warm-up from warmup_lr to lr, then cosine from lr down to min_lr, at a fractional epoch."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * epoch / cfg.warmup_epochs
    span = max(1e-12, cfg.epochs - cfg.warmup_epochs)
    progress = min(1.0, (epoch - cfg.warmup_epochs) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; no weight decay on 1-D ones (biases, norms, deltas) as in the reference."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused (one kernel over all tensors, where the default launches a handful of
    ops per tensor, or per group of tensors on CUDA) wherever torch has the fused kernel for the parameters."""
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=lr)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Turn on timm's activation checkpointing of the transformer blocks (TrainConfig.grad_checkpointing)."""
    setter = getattr(model, "set_grad_checkpointing", None)
    if not callable(setter):
        raise ValueError(f"grad_checkpointing needs a timm model with set_grad_checkpointing; "
                         f"{type(model).__name__} has none: set grad_checkpointing false")
    setter(True)


class _Totals:
    """Summed loss and correct predictions over an epoch, kept on the device: reading them per step
    (`.item()`) would make the host wait for the GPU every step, so they are read once, at the end. The loss
    sum is fp64, so the result equals summing the per-step losses as Python floats."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += loss_sum.detach().double()
        self.correct += (logits.argmax(-1) == labels).sum()

    def values(self) -> tuple[float, int]:
        return self.loss.item(), int(self.correct.item())


class Trainer:
    """Trains every parameter of `model` that requires grad; per-epoch callbacks and checkpoints."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, *, progress: bool = True):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(self.model)
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, float]] = []
        self.progress = progress

    def _autocast(self):
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def train_epoch(self, loader: Batches) -> dict[str, float]:
        # Seeded per epoch so a run resumed from a checkpoint draws the same dropout / shuffles.
        torch.manual_seed(self.cfg.seed * 1000 + self.epoch)
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(self.cfg.seed * 1000 + self.epoch)
        self.model.train()
        steps = len(loader) if hasattr(loader, "__len__") else None
        totals, seen = _Totals(self.device), 0
        start = time.perf_counter()
        with progress_bar(total=steps, desc=f"epoch {self.epoch + 1}", unit="step", enabled=self.progress) as bar:
            for i, (images, labels) in enumerate(loader):
                lr = lr_at(self.cfg, self.epoch + (i / steps if steps else 0.0))
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                with self._autocast():
                    logits = self.model(images)
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.cfg.grad_clip:
                    nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                             self.cfg.grad_clip)
                self.optimizer.step()
                totals.add(loss.detach().double() * labels.shape[0], logits, labels)
                seen += labels.shape[0]
                bar.update(1)
        self.epoch += 1
        loss_sum, correct = totals.values()
        return {"train_loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen),
                "lr": lr_at(self.cfg, self.epoch), "train_s": time.perf_counter() - start}

    @torch.no_grad()
    def evaluate(self, loader: Batches) -> dict[str, float]:
        """Mean cross-entropy and top-1 accuracy."""
        self.model.eval()
        totals, seen = _Totals(self.device), 0
        start = time.perf_counter()
        for images, labels in loader:
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(images).float()
            totals.add(F.cross_entropy(logits, labels, reduction="sum"), logits, labels)
            seen += labels.shape[0]
        if seen == 0:
            raise ValueError("evaluation got no batches; pass a non-empty loader")
        loss_sum, correct = totals.values()
        return {"loss": loss_sum / seen, "acc": correct / seen, "eval_s": time.perf_counter() - start}

    def fit(self, train: Batches, val: Batches | None = None, *,
            on_epoch: Callable[[dict[str, float]], bool | None] | None = None) -> list[dict[str, float]]:
        """Train until cfg.epochs (continuing from self.epoch); `on_epoch(metrics)` returning True stops."""
        while self.epoch < self.cfg.epochs:
            metrics: dict[str, float] = {"epoch": self.epoch + 1, **self.train_epoch(train)}
            if val is not None:
                ev = self.evaluate(val)
                metrics.update(val_loss=ev["loss"], val_acc=ev["acc"], eval_s=ev["eval_s"])
            self.history.append(metrics)
            if on_epoch is not None and on_epoch(metrics):
                break
        return self.history

    # ---- checkpoints of the plan parameters -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        params = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return {"epoch": self.epoch, "params": params, "optimizer": self.optimizer.state_dict(),
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        named = dict(self.model.named_parameters())
        missing = [n for n in state["params"] if n not in named]
        if missing:
            raise ValueError(f"checkpoint holds parameters the model lacks ({missing[:3]}); apply the same plan first")
        with torch.no_grad():
            for n, value in state["params"].items():
                named[n].copy_(value.to(named[n].device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.history = list(state.get("history", []))

    def save(self, directory: str | Path) -> Path:
        """Write `trainer.pt` (tensors, plain containers only: loadable with weights_only=True)."""
        path = Path(directory) / "trainer.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)
        return path

    def load(self, directory: str | Path) -> None:
        self.load_state_dict(torch.load(Path(directory) / "trainer.pt", map_location="cpu", weights_only=True))
