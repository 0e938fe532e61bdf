"""TrainConfig.grad_checkpointing: the same gradients as without it (sparse deltas, fused LoRA, dropout and
drop-path included), fewer bytes kept for the backward, and a clear error for a model that cannot do it."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from spt_core import ModelLayout, apply_plan
from spt_core.plan import TensorPlan, TuningPlan
from spt_core.train import TrainConfig, Trainer
from tests.conftest import tiny_vit


def _spt_model(checkpointing: bool) -> torch.nn.Module:
    model = tiny_vit(depth=3, drop_path_rate=0.1)
    layout = ModelLayout.from_model(model)
    tensors = {}
    for t in layout.matrices:
        if t.part in ("q", "v"):
            tensors[t.name] = TensorPlan("lora", rank=2)
        elif t.name.endswith("fc1.weight"):
            tensors[t.name] = TensorPlan("sparse", indices=torch.arange(0, t.numel, 7))
    model = apply_plan(model, TuningPlan(layout, tensors))
    Trainer(model, TrainConfig(epochs=1, device="cpu", grad_checkpointing=checkpointing), progress=False)
    with torch.no_grad():  # LoRA up-projections start at zero: move them so every branch carries gradient
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("up.weight"):
                p.normal_(std=0.1)
    return model


def _saved_bytes_and_grads(model, x, y):
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    torch.manual_seed(5)  # the same dropout / drop-path draws in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return sum(saved.values()), grads


def test_checkpointing_keeps_gradients_and_saves_less():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)
    plain, ckpt = _spt_model(False), _spt_model(True)
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    bytes_plain, grads_plain = _saved_bytes_and_grads(plain, x, y)
    bytes_ckpt, grads_ckpt = _saved_bytes_and_grads(ckpt, x, y)
    assert len(grads_plain) == len(grads_ckpt) > 0
    for a, b in zip(grads_plain, grads_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert bytes_ckpt < 0.5 * bytes_plain


def test_model_without_checkpointing_support_is_refused():
    with pytest.raises(ValueError, match="grad_checkpointing"):
        Trainer(torch.nn.Linear(3, 2), TrainConfig(epochs=1, device="cpu", grad_checkpointing=True), progress=False)


def test_checkpointing_is_off_by_default():
    assert TrainConfig().grad_checkpointing is False
