"""The low-bit quantizer against the 1-bit adapters paper's formulas, written out here independently.

`paper_codebook` and `qlinear_weight` follow the authors' QLinear line by line (their iteration from zeros, their
sum-of-sign-steps rounding in float32, their `q(w).data + w - w.data` estimator) using only erf / erfinv, so
these tests do not lean on anything in spt_core.
"""

import math

import pytest
import torch

from spt_core import TrainConfig, Trainer, allocate, apply_plan, quantize_weight
from spt_core.modules import Adapter, LoRA
from spt_core.modules.quant import codebook, dequantize, pack_codes, quantize_codes, unpack_codes
from tests.conftest import random_batches, tiny_vit
from tests.test_surgery import SMAP


def phi(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def phi_inv(p):
    return math.sqrt(2) * torch.erfinv(2 * p - 1)


def paper_codebook(bits):
    """500 steps from all zeros: thresholds = midpoints; value = Phi^-1 of the mid-mass of its cell."""
    values = torch.zeros(2 ** bits, dtype=torch.float64)
    ranges = torch.zeros(2 ** bits - 1, dtype=torch.float64)
    for _ in range(500):
        ranges = (values[1:] + values[:-1]) / 2
        zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        pv = torch.cat([zero, phi(ranges), one])
        values = phi_inv((pv[1:] + pv[:-1]) / 2)
    return values, ranges


def qlinear_weight(w, bits):
    """The weight the authors' QLinear.forward multiplies by (codebook in the weight's dtype: float32 as theirs)."""
    values, ranges = paper_codebook(bits)
    value, pos = values.to(w.dtype), ranges.to(w.dtype)
    delta = (value[1:] - value[:-1]) / 2
    mean_w, std_w = w.mean(), w.std()
    w = (w - mean_w) / (std_w + 1e-5)
    q = (torch.sign(w.unsqueeze(-1) - pos) * delta).sum(-1)
    wb = q.detach() + w - w.detach()
    return wb * std_w + mean_w


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


KNOWN = {  # fixed points quoted by the paper's construction (REFERENCE.md section 2)
    1: ([-0.6744898, 0.6744898], [0.0]),
    2: ([-1.2657203, -0.3777542, 0.3777542, 1.2657203], [-0.8217372, 0.0, 0.8217372]),
}


@pytest.mark.parametrize("bits", [1, 2])
def test_codebook_is_the_papers_fixed_point(bits):
    values, thresholds = codebook(bits)
    ref_values, ref_ranges = paper_codebook(bits)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-6)
    torch.testing.assert_close(thresholds, ref_ranges, rtol=0, atol=1e-6)
    known_v, known_t = (torch.tensor(x, dtype=torch.float64) for x in KNOWN[bits])
    torch.testing.assert_close(values, known_v, rtol=0, atol=1e-6)
    torch.testing.assert_close(thresholds, known_t, rtol=0, atol=1e-6)
    # the fixed-point conditions themselves (this is not Lloyd-Max: values are not the cells' conditional means)
    torch.testing.assert_close(thresholds, (values[1:] + values[:-1]) / 2, rtol=0, atol=1e-9)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), phi(thresholds), torch.ones(1, dtype=torch.float64)])
    torch.testing.assert_close(values, phi_inv((cdf[1:] + cdf[:-1]) / 2), rtol=0, atol=1e-9)


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("shape,scale,shift", [((4, 3), 1.0, 0.0), ((8, 48), 0.02, 0.01), ((256, 512), 1e-3, -3e-4)])
def test_forward_equals_qlinear(bits, shape, scale, shift):
    """Small tensors expose a biased std (4% off at 12 entries); 131k entries put weights between the exact
    2-bit threshold 0.8217372 and a rounded 0.822, where a rounded codebook flips codes."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * scale + shift
    ref, out = qlinear_weight(w, bits), quantize_weight(w, bits)
    assert out.shape == w.shape and out.dtype == w.dtype
    assert rel_err(out, ref) <= 1e-6
    gap = ((out - w.mean()) / w.std()).reshape(-1, 1) - codebook(bits)[0].float()
    assert float(gap.abs().min(1).values.max()) < 1e-4  # every weight sits on a code
    assert gap.abs().argmin(1).unique().numel() == 2 ** bits


@pytest.mark.parametrize("bits", [1, 2])
def test_entries_on_a_threshold_map_between_codes(bits):
    w = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])  # w_hat of 0.0 is exactly the middle threshold
    out = quantize_weight(w, bits)
    assert float(out[2]) == 0.0
    assert rel_err(out, qlinear_weight(w, bits)) <= 1e-6


@pytest.mark.parametrize("bits", [1, 2])
def test_gradient_equals_qlinear(bits):
    """Autograd of the authors' estimator: through the standardisation, mean and std; not a pass-through."""
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(16, 24, generator=g, dtype=torch.float64) * 0.3 + 0.1).requires_grad_(True)
    upstream = torch.randn(16, 24, generator=g, dtype=torch.float64)
    (ref,) = torch.autograd.grad((qlinear_weight(w, bits) * upstream).sum(), w)
    (got,) = torch.autograd.grad((quantize_weight(w, bits) * upstream).sum(), w)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, upstream, rtol=0.05)


def test_zero_weights_cannot_break_symmetry():
    """Why quantized up-projections do not start at zero: every entry of a constant matrix gets one gradient."""
    for bits in (1, 2):
        w = torch.zeros(6, 4, requires_grad=True)
        (quantize_weight(w, bits) * torch.randn(6, 4)).sum().backward()
        assert torch.unique(w.grad).numel() == 1


def test_bad_bits_is_a_clear_error():
    for bits in (0, 9, 1.5, True):
        with pytest.raises(ValueError, match="bits must be an integer"):
            quantize_weight(torch.randn(3, 3), bits)


@pytest.mark.parametrize("bits", [1, 2])
def test_stored_codes_reproduce_the_forward_value_exactly(bits):
    w = torch.randn(33, 7, generator=torch.Generator().manual_seed(2)) * 0.05
    codes, mean, std = quantize_codes(w, bits)
    assert int(codes.min()) == 0 and int(codes.max()) == 2 ** bits - 1
    assert torch.equal(std, w.std())  # unbiased, like the forward
    packed = pack_codes(codes, bits)
    assert packed.numel() == math.ceil(w.numel() * bits / 8)
    restored = dequantize(unpack_codes(packed, bits, w.numel()).reshape(w.shape), mean, std, bits)
    assert torch.equal(restored, quantize_weight(w, bits))


@pytest.mark.parametrize("structured", ["lora", "adapter"])
@pytest.mark.parametrize("bits", [1, 2])
def test_quantized_plan_trains_and_keeps_frozen_weights(structured, bits):
    model = tiny_vit(drop_path_rate=0.1)
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_plan(model, allocate(SMAP, 6000, structured=structured, bits=bits))
    branches = [m for m in model.modules() if isinstance(m, (LoRA, Adapter))]
    assert branches and all(m.bits == bits for m in branches)
    # the paper's init: up weights small and non-zero, on a +-2e-3 truncated normal
    for m in branches:
        up = m.up.weight.detach()
        assert 0 < float(up.abs().max()) <= 2e-3 and float(up.std()) > 1e-4
    x, y = random_batches(1)[0]
    torch.nn.functional.cross_entropy(model.train()(x), y).backward()
    for m in branches:  # every quantized matrix gets a gradient that differs across its entries
        for lin in (m.down, m.up):
            assert lin.weight.grad is not None and float(lin.weight.grad.std()) > 0
    model.zero_grad()
    downs = [m.down.weight.detach().clone() for m in branches]
    Trainer(model, TrainConfig(epochs=2, warmup_epochs=0, lr=1e-2, device="cpu"), progress=False).fit(random_batches(2))
    for name, p in model.named_parameters():
        if name in pretrained and not p.requires_grad:
            assert torch.equal(p, pretrained[name]), f"{name} moved but is frozen"
    assert all(not torch.equal(m.down.weight, d) for m, d in zip(branches, downs))


def test_float_branches_still_start_at_zero():
    assert torch.count_nonzero(LoRA(8, 6, 2).up.weight) == 0
    assert torch.count_nonzero(Adapter(6, 2).up.weight) == 0
    assert torch.count_nonzero(LoRA(8, 6, 2, bits=1).up.weight) == 12
