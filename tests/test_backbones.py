"""Backbones: checkpoint formats round trip, fresh head, pos_embed resampling, provenance, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, _load_weights

from spt_core.backbones import BackboneError, BackboneInfo, create_backbone, read_checkpoint
from spt_core.backbones_npz import save_npz
from spt_core.embedded import EMBEDDED_CONFIG, EMBEDDED_WEIGHTS

TINY = dict(patch_size=4, embed_dim=48, depth=2, num_heads=3)
NAME = "vit_tiny_patch16_224"  # any timm ViT name; the kwargs shrink it


def _source(num_classes: int = 7, **overrides) -> VisionTransformer:
    torch.manual_seed(123)
    return VisionTransformer(img_size=32, num_classes=num_classes, **{**TINY, **overrides}).eval()


def _x() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _features(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().forward_features(_x())


def _load(path: Path, **kwargs) -> tuple[torch.nn.Module, BackboneInfo]:
    return create_backbone(NAME, weights=path, num_classes=kwargs.pop("num_classes", 5),
                           img_size=kwargs.pop("img_size", 32), **TINY, **kwargs)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_fresh_head(model: torch.nn.Module, num_classes: int) -> None:
    assert model.head.weight.shape[0] == num_classes
    assert torch.all(model.head.bias == 0)
    std = model.head.weight.std().item()
    assert 0.01 < std < 0.03 and model.head.weight.abs().max() < 0.2  # trunc-normal(std 0.02), never zero


def _writers() -> dict[str, callable]:
    return {
        "plain.pth": lambda m, p: torch.save(m.state_dict(), p),
        "wrapped.pth": lambda m, p: torch.save({"state_dict": m.state_dict(), "epoch": 3}, p),
        "model.pt": lambda m, p: torch.save({"model": m.state_dict()}, p),
        "ddp.pth": lambda m, p: torch.save({f"module.{k}": v for k, v in m.state_dict().items()}, p),
        "w.safetensors": lambda m, p: save_file(m.state_dict(), str(p)),
        "google.npz": lambda m, p: save_npz(m, p),
    }


@pytest.mark.parametrize("fname", list(_writers()))
def test_round_trip_same_features_fresh_head(tmp_path: Path, fname: str) -> None:
    src = _source()
    path = tmp_path / fname
    _writers()[fname](src, path)
    model, info = _load(path, num_classes=5)
    assert torch.equal(_features(model), _features(src))
    _assert_fresh_head(model, 5)
    assert info.weights == str(path) and info.weights_sha256 == _sha(path)
    assert info.num_classes == 5 and info.img_size == 32
    assert info.num_params == sum(p.numel() for p in model.parameters())
    assert set(info.to_dict()) == {"name", "weights", "weights_sha256", "num_classes", "img_size", "num_params"}


def test_npz_is_googles_format(tmp_path: Path) -> None:
    """timm's own reader of the original ViT .npz agrees with our exporter and our loader."""
    src = _source()
    path = save_npz(src, tmp_path / "ViT-tiny.npz")
    keys = set(np.load(path).files)
    assert {"embedding/kernel", "cls", "Transformer/posembed_input/pos_embedding", "Transformer/encoder_norm/scale",
            "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel",
            "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"} <= keys
    assert np.load(path)["embedding/kernel"].shape == (4, 4, 3, 48)
    timm_model = VisionTransformer(img_size=32, num_classes=7, **TINY)
    _load_weights(timm_model, str(path))
    assert torch.equal(_features(timm_model), _features(src))

    arrays = dict(np.load(path))
    np.savez(tmp_path / "opt.npz", **{f"opt/target/{k}": v for k, v in arrays.items()}, **{"pre_logits/kernel": 0})
    assert torch.equal(_features(_load(tmp_path / "opt.npz")[0]), _features(src))


def test_pos_embed_resampled_for_other_img_size(tmp_path: Path) -> None:
    src = _source()
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    model, info = _load(path, img_size=48)
    assert info.img_size == 48 and model.pos_embed.shape == (1, 1 + 12 * 12, 48)
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[12, 12], num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected)
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 5)


def test_random_init_seeded_and_hashed() -> None:
    state = torch.random.get_rng_state()
    a, ia = create_backbone(NAME, num_classes=4, img_size=32, seed=1, **TINY)
    b, ib = create_backbone(NAME, num_classes=4, img_size=32, seed=1, **TINY)
    _, ic = create_backbone(NAME, num_classes=4, img_size=32, seed=2, **TINY)
    assert torch.equal(state, torch.random.get_rng_state())  # forked RNG: the global stream is untouched
    assert ia.weights is None and ia.weights_sha256 == ib.weights_sha256 != ic.weights_sha256
    assert torch.equal(a.head.weight, b.head.weight)
    _assert_fresh_head(a, 4)


def test_seeded_random_builds_agree_across_threads() -> None:
    """The store hashes random-weight backbones in worker threads: concurrent seeded builds must each get the
    same weights as one build alone (without a lock all twelve differed)."""
    import threading

    alone = create_backbone("spt-mini-vit", weights="random", num_classes=3, seed=7)[1].weights_sha256
    got: list[str] = []

    def build() -> None:
        for _ in range(3):
            got.append(create_backbone("spt-mini-vit", weights="random", num_classes=3, seed=7)[1].weights_sha256)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [alone] * 12


def test_drop_path_and_timm_kwargs_pass_through() -> None:
    model, _ = create_backbone(NAME, num_classes=3, img_size=32, drop_path_rate=0.2, seed=0, **TINY)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert model.patch_embed.patch_size == (4, 4)


# ----------------------------------------------------------------------------- errors
def _error(path: Path, **kwargs) -> str:
    with pytest.raises(BackboneError) as info:
        _load(path, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "fix:" in msg
    return msg


def test_missing_and_unsupported(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "nope.pth")
    (tmp_path / "w.onnx").write_bytes(b"x")
    assert "unsupported format .onnx" in _error(tmp_path / "w.onnx")


@pytest.mark.parametrize("fname", ["w.pth", "w.safetensors", "w.npz"])
def test_corrupt_files(tmp_path: Path, fname: str) -> None:
    path = tmp_path / fname
    _writers()[{"w.pth": "plain.pth", "w.safetensors": "w.safetensors", "w.npz": "google.npz"}[fname]](_source(), path)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])  # truncated
    assert "cannot read checkpoint" in _error(path)
    path.write_bytes(b"\x00garbage" * 10)
    assert "cannot read checkpoint" in _error(path)


def test_unsafe_or_odd_pickles(tmp_path: Path) -> None:
    path = tmp_path / "args.pth"
    torch.save({"state_dict": _source().state_dict(), "args": Path("x")}, path)  # not weights_only-safe
    assert "cannot read checkpoint" in _error(path)
    torch.save({"weights": [1, 2, 3]}, path)
    assert "non-tensor entries" in _error(path)
    torch.save([torch.zeros(1)], path)
    assert "holds no state dict" in _error(path)


def test_mismatched_checkpoints(tmp_path: Path) -> None:
    deeper = tmp_path / "deeper.safetensors"
    save_file(_source(depth=3).state_dict(), str(deeper))
    msg = _error(deeper)
    assert "does not fit the model" in msg and "unexpected" in msg and "blocks.2." in msg

    wider = tmp_path / "wider.pth"
    torch.save(_source(embed_dim=60).state_dict(), wider)
    assert "shape mismatches" in _error(wider) and "(60, 60) vs (48, 48)" in _error(wider)
    assert "shape mismatches" in _error(wider, img_size=48)

    partial = tmp_path / "partial.pth"
    sd = _source().state_dict()
    del sd["blocks.1.mlp.fc2.weight"], sd["norm.bias"]
    torch.save(sd, partial)
    assert "2 missing (blocks.1.mlp.fc2.weight, norm.bias)" in _error(partial)

    npz = save_npz(_source(), tmp_path / "g.npz")
    arrays = dict(np.load(npz))
    del arrays["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/kernel"]
    np.savez(npz, **arrays)
    assert "not a Google ViT .npz" in _error(npz) and "key/kernel" in _error(npz)


def test_unknown_name() -> None:
    with pytest.raises(BackboneError, match="cannot build backbone 'no_such_vit'"):
        create_backbone("no_such_vit", num_classes=2)


# ----------------------------------------------------------------------------- embedded
def test_embedded_backbone_loads_shipped_weights() -> None:
    recipe = json.loads(EMBEDDED_WEIGHTS.with_suffix(".json").read_text())
    model, info = create_backbone("spt-mini-vit", num_classes=10)
    assert info.weights_sha256 == recipe["sha256"] == _sha(EMBEDDED_WEIGHTS)
    assert info.img_size == EMBEDDED_CONFIG["img_size"] == 32 and info.weights == str(EMBEDDED_WEIGHTS)
    assert EMBEDDED_WEIGHTS.stat().st_size < 6 * 2**20
    _assert_fresh_head(model, 10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    again, info2 = create_backbone("spt-mini-vit", num_classes=3, seed=0)
    assert info2.weights_sha256 == info.weights_sha256
    assert torch.equal(_features(again), _features(model))
    _, rand = create_backbone("spt-mini-vit", weights="random", num_classes=3, seed=0)
    assert rand.weights is None and rand.weights_sha256 != info.weights_sha256


def test_pretrain_embedded_is_reproducible(tmp_path: Path) -> None:
    from spt_core.embedded import pretrain_embedded

    kw = dict(seed=3, steps=2, batch_size=4, eval_images=8, progress=False)
    a = pretrain_embedded(tmp_path / "a" / "w.safetensors", **kw)
    b = pretrain_embedded(tmp_path / "b" / "w.safetensors", **kw)
    assert a["sha256"] == b["sha256"] == _sha(tmp_path / "a" / "w.safetensors")
    assert json.loads((tmp_path / "a" / "w.json").read_text())["steps"] == 2
    model, info = create_backbone("spt-mini-vit", weights=tmp_path / "a" / "w.safetensors", num_classes=2)
    assert info.weights_sha256 == a["sha256"]


def test_upstream_batch_labels_every_head_within_its_classes() -> None:
    from spt_core.embedded import UPSTREAM_HEADS, upstream_batch, upstream_loss

    images, labels = upstream_batch(np.random.default_rng(0), 256)
    again, labels2 = upstream_batch(np.random.default_rng(0), 256)
    assert images.shape == (256, 32, 32, 3) and images.dtype == np.uint8 and labels.shape == (256, 4)
    assert np.array_equal(images, again) and np.array_equal(labels, labels2)
    for i, classes in enumerate(UPSTREAM_HEADS.values()):
        assert 0 <= labels[:, i].min() and labels[:, i].max() < classes
        assert np.unique(labels[:, i]).size > classes // 2  # every head varies over its range
    logits = torch.randn(256, sum(UPSTREAM_HEADS.values()))
    target = torch.from_numpy(labels)
    expected, start = 0.0, 0
    for i, classes in enumerate(UPSTREAM_HEADS.values()):
        expected += torch.nn.functional.cross_entropy(logits[:, start:start + classes], target[:, i],
                                                      label_smoothing=0.1)
        start += classes
    assert torch.allclose(upstream_loss(logits, target), expected)
