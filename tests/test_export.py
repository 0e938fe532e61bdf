import pytest
import torch

from spt_core import apply_plan
from spt_core.export import DELTA_FILE, DeltaError, load_delta, save_delta
from tests.conftest import tiny_vit
from tests.test_surgery import PLANS, nudge


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
