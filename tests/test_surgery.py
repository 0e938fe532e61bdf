import copy

import pytest
import torch

from spt_core import (ModelLayout, SensitivityMap, TrainConfig, Trainer, TuningPlan, allocate, apply_plan, bitfit,
                      full_finetune, linear_probe, merge_plan, trainable_parameters, uniform_adapter, uniform_lora)
from spt_core.modules.tuned import TunedLayerNorm, TunedLinear
from tests.conftest import random_batches, tiny_vit


def scored_map(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = {}
    for p in layout.scored_params:
        shape = next(t for t in layout if t.param == p)
        rows = sum(t.shape[0] for t in layout.scored if t.param == p)
        scores[p] = torch.rand(rows, *shape.shape[1:], generator=g) ** 6
    return SensitivityMap(scores, layout)


LAYOUT = ModelLayout.from_model(tiny_vit())
SMAP = scored_map(LAYOUT)
PLANS = {
    "spt-lora-small": lambda: allocate(SMAP, 800),
    "spt-lora": lambda: allocate(SMAP, 6000),
    "spt-adapter": lambda: allocate(SMAP, 6000, structured="adapter"),
    "spt-lora-2bit": lambda: allocate(SMAP, 6000, bits=2),
    "spt-adapter-1bit": lambda: allocate(SMAP, 6000, structured="adapter", bits=1),
    "linear": lambda: linear_probe(LAYOUT),
    "full": lambda: full_finetune(LAYOUT),
    "bitfit": lambda: bitfit(LAYOUT),
    "uniform-lora": lambda: uniform_lora(LAYOUT, rank=4),
    "uniform-lora-all": lambda: uniform_lora(LAYOUT, rank=2, targets=("q", "k", "v", "proj", "fc1", "fc2")),
    "uniform-adapter": lambda: uniform_adapter(LAYOUT, rank=4, targets=("fc1", "fc2", "v")),
}


def nudge(model):
    """Move every trainable parameter away from its (often zero) initial value."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


@pytest.fixture(params=sorted(PLANS))
def plan(request):
    return PLANS[request.param]()


def test_output_unchanged_right_after_surgery(plan):
    """Bit-exact for float plans; quantized up-projections start small, not zero (the paper's init, test_quant)."""
    model, x = tiny_vit().eval(), torch.randn(3, 3, 32, 32)
    expected = model(x).detach()
    apply_plan(model, plan).eval()
    quantized = any(tp.bits for tp in plan.tensors.values())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0.01 * expected.abs().max().item() if quantized else 0)


def test_trainable_parameters_match_plan_accounting(plan):
    model = apply_plan(tiny_vit(), plan)
    assert sum(p.numel() for p in trainable_parameters(model).values()) == plan.trainable_params
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith("head"))
    assert head == plan.head_params == LAYOUT.head_params


def test_frozen_weights_bit_identical_after_training(plan):
    model = tiny_vit(drop_path_rate=0.1)
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_plan(model, plan)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(model, TrainConfig(epochs=2, warmup_epochs=0, lr=1e-2, device="cpu"), progress=False)
    trainer.fit(random_batches(2))
    changed = 0
    for name, before in pretrained.items():
        now = model.get_parameter(name)
        if name in trained:
            changed += not torch.equal(now, before)
        else:
            assert torch.equal(now, before), f"{name} moved but is not in the plan"
    new = [n for n, p in model.named_parameters() if n not in pretrained]
    assert all(model.get_parameter(n).requires_grad for n in new)
    assert changed or new  # something did train


def test_merge_equals_unmerged(plan):
    model = apply_plan(tiny_vit(), plan).eval()
    nudge(model)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    merge_plan(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    has_adapter = any(tp.kind == "adapter" for tp in plan.tensors.values())
    remaining = [m for m in model.modules() if isinstance(m, (TunedLinear, TunedLayerNorm))]
    assert bool(remaining) == has_adapter


def test_json_round_trip(plan):
    back = TuningPlan.from_json(plan.to_json())
    assert back.trainable_params == plan.trainable_params and back.storage_bytes == plan.storage_bytes
    assert back.layout.signature == plan.layout.signature
    for name, tp in plan.tensors.items():
        other = back.tensors[name]
        assert (other.kind, other.rank, other.bits) == (tp.kind, tp.rank, tp.bits)
        if tp.kind == "sparse":
            assert torch.equal(other.indices, tp.indices)


def test_sparse_layer_norm_entries_are_trained():
    plan = allocate(SMAP, 3000)
    norm_sparse = [n for n in plan.of_kind("sparse") if "norm" in n]
    assert norm_sparse, "the map should put sparse picks into LayerNorm vectors"
    model = apply_plan(tiny_vit(), plan)
    for name in norm_sparse:
        module = model.get_submodule(plan.layout[name].module)
        assert isinstance(module, TunedLayerNorm) and plan.layout[name].attr in module.deltas


def test_plan_for_another_model_and_double_apply_are_rejected():
    plan = allocate(SMAP, 2000)
    with pytest.raises(ValueError, match="different model"):
        apply_plan(tiny_vit(depth=3), plan)
    model = apply_plan(tiny_vit(), plan)
    with pytest.raises(ValueError, match="already applied"):
        apply_plan(model, plan)


def test_storage_bytes_accounting():
    plan = allocate(SMAP, 6000)
    sparse, lora, full = plan.count("sparse"), plan.count("lora"), plan.count("full")
    assert plan.storage_bytes == 8 * sparse + 4 * (lora + full) + 4 * LAYOUT.head_params
    low = allocate(SMAP, 6000, bits=1)
    assert low.trainable_params == plan.trainable_params and low.storage_bytes < plan.storage_bytes - 3 * lora
    assert "total" in plan.summary() and "blocks.0" in plan.summary()
