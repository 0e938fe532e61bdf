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
