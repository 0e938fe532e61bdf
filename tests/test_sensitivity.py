import torch
from torch.nn import functional as F

from spt_core import ModelLayout, compute_sensitivity
from tests.conftest import random_batches, tiny_vit


def explicit_sensitivity(model, batches):
    """Brute force: backward through every parameter, square each gradient, sum over batches."""
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad ** 2
    return acc


def test_equals_explicit_sum_of_squared_gradients():
    model = tiny_vit().eval()
    batches = random_batches(3)
    smap = compute_sensitivity(model, batches, progress=False)
    expected = explicit_sensitivity(tiny_vit().eval(), batches)
    assert set(smap) == set(ModelLayout.from_model(model).scored_params)
    for name, scores in smap.items():
        torch.testing.assert_close(scores, expected[name], rtol=1e-5, atol=1e-12)
        assert scores.dtype == torch.float32 and scores.shape == expected[name].shape
    assert smap.meta["num_samples"] == 12 and smap.meta["num_batches"] == 3


def test_scored_set_excludes_head_embeddings_and_cls_token():
    smap = compute_sensitivity(tiny_vit(), random_batches(1), progress=False)
    for name in smap:
        assert not name.startswith(("head", "cls_token", "pos_embed", "patch_embed"))
    assert "blocks.0.attn.qkv.weight" in smap and "blocks.1.norm2.bias" in smap and "norm.weight" in smap
    q = smap.logical("blocks.0.attn.q.weight")
    assert q.shape == (48, 48) and torch.equal(q, smap["blocks.0.attn.qkv.weight"][:48])


def test_requires_grad_flags_restored_and_num_batches_honoured():
    model = tiny_vit()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head"))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    smap = compute_sensitivity(model, iter(random_batches(5)), num_batches=2, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert smap.meta["num_batches"] == 2
    assert all(p.grad is None for p in model.parameters())


def test_head_is_the_callers_and_a_zero_head_gives_zero_scores():
    model = tiny_vit().eval()
    torch.nn.init.zeros_(model.head.weight)
    smap = compute_sensitivity(model, random_batches(1), progress=False)
    assert all(float(s.abs().max()) == 0.0 for s in smap.values())


def test_empty_batches_raise():
    import pytest

    with pytest.raises(ValueError, match="no batches"):
        compute_sensitivity(tiny_vit(), [], progress=False)


def test_save_load_round_trip(tmp_path):
    smap = compute_sensitivity(tiny_vit(), random_batches(1), progress=False)
    smap.save(tmp_path / "map.safetensors")
    back = type(smap).load(tmp_path / "map.safetensors")
    assert back.meta == smap.meta and back.layout == smap.layout
    assert all(torch.equal(back[n], smap[n]) for n in smap)
