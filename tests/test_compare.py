"""compare_allocations on hand-made plans whose overlaps are known."""

import pytest
import torch

from spt_core import ModelLayout, TensorPlan, TuningPlan
from spt_core.compare import Overlap, compare_allocations, format_comparison
from tests.conftest import tiny_vit

D, HIDDEN = 48, 192  # tiny_vit: embed dim 48, mlp 4x


@pytest.fixture(scope="module")
def layout() -> ModelLayout:
    return ModelLayout.from_model(tiny_vit())


def sparse(*indices: int) -> TensorPlan:
    return TensorPlan("sparse", torch.tensor(indices, dtype=torch.int64))


def lora(rank: int = 2) -> TensorPlan:
    return TensorPlan("lora", rank=rank)


FULL = TensorPlan("full")


@pytest.fixture
def ours(layout) -> TuningPlan:
    return TuningPlan(layout, {
        "cls_token": FULL,
        "blocks.0.attn.q.weight": lora(), "blocks.0.attn.v.weight": lora(), "blocks.1.mlp.fc1.weight": lora(),
        "blocks.0.norm1.weight": FULL, "blocks.1.attn.proj.bias": FULL,
        "blocks.0.attn.k.weight": sparse(0, 1, 2, 3, 10), "blocks.1.attn.proj.weight": sparse(0, 5),
    }, meta={"budget": 1000})


@pytest.fixture
def theirs(layout) -> TuningPlan:
    return TuningPlan(layout, {
        "cls_token": FULL,
        "blocks.0.attn.v.weight": TensorPlan("adapter", rank=2), "blocks.1.mlp.fc1.weight": lora(),
        "blocks.1.mlp.fc2.weight": lora(), "blocks.1.attn.q.weight": lora(),
        "blocks.1.attn.proj.bias": FULL, "norm.bias": FULL, "blocks.0.norm1.bias": FULL,
        # the same flat positions 0 and 5 as ours, but in another tensor: they must not count as shared
        "blocks.0.attn.k.weight": sparse(2, 3, 4, 10, 11), "blocks.1.attn.k.weight": sparse(0, 5),
    }, meta={"budget": 300})


def test_overlaps_and_jaccard(ours, theirs):
    c = compare_allocations(ours, theirs)
    assert c.matrices == Overlap(ours=3, theirs=4, both=2) and c.matrices.jaccard == pytest.approx(2 / 5)
    assert c.type_mismatches == 1  # blocks.0 v: LoRA here, Adapter there
    assert c.vectors == Overlap(ours=2, theirs=3, both=1) and c.vectors.jaccard == pytest.approx(1 / 4)
    assert c.sparse == Overlap(ours=7, theirs=7, both=3) and c.sparse.jaccard == pytest.approx(3 / 11)


def test_totals_and_budget_misses(ours, theirs):
    c = compare_allocations(ours, theirs)
    lora_qv, lora_fc = 2 * (D + D), 2 * (D + HIDDEN)
    assert (c.ours.sparse, c.ours.structured, c.ours.whole) == (7, 2 * lora_qv + lora_fc, 3 * D)
    assert c.ours.total == 7 + 2 * lora_qv + lora_fc + 3 * D == 1015
    assert (c.ours.budget, c.ours.miss) == (1000, 15) and c.ours.relative_miss == pytest.approx(0.015)
    adapter_v = 2 * D * 2 + 2 + D
    assert c.theirs.structured == adapter_v + 2 * lora_fc + lora_qv
    assert c.theirs.total == theirs.trainable_params and c.theirs.budget == 300
    forced = compare_allocations(ours, theirs, budget=2000)
    assert (forced.ours.miss, forced.theirs.miss) == (1015 - 2000, theirs.trainable_params - 2000)


def test_symmetry_and_identity(ours, theirs, layout):
    a, b = compare_allocations(ours, theirs), compare_allocations(theirs, ours)
    for field in ("matrices", "vectors", "sparse"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x.ours, x.theirs, x.both) == (y.theirs, y.ours, y.both)
    same = compare_allocations(ours, ours)
    assert same.matrices.jaccard == same.vectors.jaccard == same.sparse.jaccard == 1.0
    empty = TuningPlan(layout, {})
    nothing = compare_allocations(empty, empty)
    assert nothing.sparse == Overlap(0, 0, 0) and nothing.sparse.jaccard == 1.0 and nothing.ours.miss is None
    assert compare_allocations(ours, empty).matrices.jaccard == 0.0


def test_heads_may_differ_but_backbones_may_not(ours):
    other_head = ModelLayout.from_model(tiny_vit(num_classes=9))
    c = compare_allocations(ours, TuningPlan(other_head, dict(ours.tensors)))
    assert c.sparse.jaccard == 1.0
    deeper = ModelLayout.from_model(tiny_vit(depth=3))
    with pytest.raises(ValueError, match="different backbones"):
        compare_allocations(ours, TuningPlan(deeper, {"cls_token": FULL}))


def test_format_and_dict(ours, theirs):
    c = compare_allocations(ours, theirs)
    text = format_comparison(c, names=("spt-ray", "reference"))
    assert "spt-ray" in text and "reference" in text and "0.273" in text and "+15 (+1.5%)" in text
    assert "1 matrices structured by both" in text
    d = c.to_dict()
    assert d["sparse"]["union"] == 11 and d["ours"]["miss"] == 15 and d["type_mismatches"] == 1
