import pytest
import timm
import torch

from spt_core import apply_plan
from spt_core.allocate import allocate
from spt_core.baselines import bitfit, full_finetune, uniform_lora
from spt_core.export import DELTA_FILE, DeltaError, load_delta, save_delta
from tests.conftest import tiny_vit
from tests.test_surgery import PLANS, nudge, scored_map


@pytest.mark.parametrize("name", sorted(PLANS))
def test_saved_delta_reproduces_outputs_exactly(tmp_path, name):
    plan = PLANS[name]()
    model = apply_plan(tiny_vit(), plan)
    nudge(model)
    x = torch.randn(4, 3, 32, 32)
    expected = model.eval()(x)
    save_delta(model, tmp_path / "delta", meta={"task": "t"})
    fresh = load_delta(tiny_vit(), tmp_path / "delta").eval()
    assert torch.equal(fresh(x), expected)
    if plan.meta.get("bits"):
        # packed bits: the file is far below fp32 storage of the same parameters
        assert (tmp_path / "delta" / DELTA_FILE).stat().st_size < 4 * plan.trainable_params


def test_missing_or_mismatched_delta_is_a_clear_error(tmp_path):
    with pytest.raises(DeltaError, match="missing"):
        load_delta(tiny_vit(), tmp_path)
    model = apply_plan(tiny_vit(), PLANS["spt-lora"]())
    save_delta(model, tmp_path / "d")
    with pytest.raises(ValueError, match="different model"):
        load_delta(tiny_vit(depth=3), tmp_path / "d")
    with pytest.raises(DeltaError, match="no applied plan"):
        save_delta(tiny_vit(), tmp_path / "e")


def test_delta_records_the_sha256_of_its_file_and_refuses_changed_values(tmp_path):
    import hashlib
    import json

    from spt_core.export import CHECKSUM_KEY, META_FILE

    model = apply_plan(tiny_vit(), PLANS["spt-lora"]())
    nudge(model)
    save_delta(model, tmp_path / "d", meta={"task": "t"})
    data = (tmp_path / "d" / DELTA_FILE).read_bytes()
    meta = json.loads((tmp_path / "d" / META_FILE).read_text())
    assert meta == {"task": "t", CHECKSUM_KEY: hashlib.sha256(data).hexdigest()}  # what `sha256sum` prints
    flipped = bytearray(data)
    flipped[-1] ^= 0x01  # one bit of the last stored value: the file still parses
    (tmp_path / "d" / DELTA_FILE).write_bytes(bytes(flipped))
    with pytest.raises(DeltaError, match=r"changed since export: sha256 [0-9a-f]{16}\.\.\. != "
                                         rf"{meta[CHECKSUM_KEY][:16]}\.\.\. .*re-export it"):
        load_delta(tiny_vit(), tmp_path / "d")


def test_delta_without_a_checksum_still_loads_and_a_corrupt_header_is_one_error(tmp_path):
    """Deltas exported before checksums load as before; a damaged header is a DeltaError, not a crash."""
    import json

    from spt_core.export import CHECKSUM_KEY, META_FILE

    model = apply_plan(tiny_vit(), PLANS["spt-lora"]())
    save_delta(model, tmp_path / "d")
    meta_path = tmp_path / "d" / META_FILE
    meta_path.write_text(json.dumps({k: v for k, v in json.loads(meta_path.read_text()).items() if k != CHECKSUM_KEY}))
    load_delta(tiny_vit(), tmp_path / "d")
    path = tmp_path / "d" / DELTA_FILE
    path.write_bytes(path.read_bytes()[:8] + b"{oops")
    with pytest.raises(DeltaError, match="unreadable delta.*export it again"):
        load_delta(tiny_vit(), tmp_path / "d")


# ---- merged timm weights (`spt-ray export --merged`) ------------------------------------------------
MINI_PLANS = {  # kinds folded: sparse + whole tensors + LoRA, 2-bit LoRA, bias/LN vectors, everything
    "spt-lora": lambda smap, layout: allocate(smap, 20_000),
    "spt-lora-2bit": lambda smap, layout: allocate(smap, 20_000, bits=2),
    "uniform-lora": lambda smap, layout: uniform_lora(layout, rank=4),
    "bitfit": lambda smap, layout: bitfit(layout),
    "full": lambda smap, layout: full_finetune(layout),
}


@pytest.mark.parametrize("name", sorted(MINI_PLANS))
def test_merged_weights_load_in_plain_timm_with_the_same_logits(tmp_path, name):
    """The embedded mini backbone with a trained-looking delta, folded and reloaded by timm alone: the same
    logits as the delta model (float tolerance: W + BA is summed once instead of per forward)."""
    from spt_core.backbones import create_backbone
    from spt_core.embedded import EMBEDDED_CONFIG, EMBEDDED_NAME
    from spt_core.export import save_merged
    from spt_core.layout import ModelLayout

    model, _ = create_backbone(EMBEDDED_NAME, num_classes=7, seed=0)
    layout = ModelLayout.from_model(model)
    plan = MINI_PLANS[name](scored_map(layout), layout)
    apply_plan(model, plan)
    nudge(model)
    model.eval()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    path = save_merged(model, tmp_path / "merged.safetensors")
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=7), **EMBEDDED_CONFIG).eval()
    with torch.no_grad():
        got = plain(x)
    assert got.shape == (6, 7)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, create_backbone(EMBEDDED_NAME, num_classes=7, seed=0)[0].eval()(x), atol=1e-3)
    assert not hasattr(plain, "spt_plan") and "spt" not in type(plain.blocks[0].attn.qkv).__module__


def test_merged_export_refuses_adapters_in_one_line(tmp_path):
    from spt_core.export import save_merged

    model = apply_plan(tiny_vit(), PLANS["spt-adapter"]())
    with pytest.raises(DeltaError) as info:
        save_merged(model, tmp_path / "m.safetensors")
    message = str(info.value)
    assert "\n" not in message and "Adapter" in message and "cannot fold" in message
    assert "without --merged" in message
    assert not (tmp_path / "m.safetensors").exists()
