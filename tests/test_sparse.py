import pytest
import torch
from torch.nn import functional as F

from spt_core.modules.sparse import csr_pattern, sampled_grad, sparse_delta_linear


def setup(d_in=24, d_out=16, k=40, tokens=(3, 7), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.sort(torch.randperm(d_in * d_out, generator=g)[:k]).values
    rows, cols = flat // d_in, flat % d_in
    weight = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    bias = torch.randn(d_out, generator=g, dtype=dtype)
    x = torch.randn(*tokens, d_in, generator=g, dtype=dtype, requires_grad=True)
    delta = (0.1 * torch.randn(k, generator=g, dtype=dtype)).requires_grad_()
    return weight, bias, x, delta, rows, cols, csr_pattern(rows, cols, (d_out, d_in))


@pytest.mark.parametrize("use_pattern", [True, False])
def test_delta_gradient_equals_dense_weight_gradient_at_the_positions(use_pattern):
    weight, bias, x, delta, rows, cols, pattern = setup()
    y = sparse_delta_linear(x, weight, bias, delta, rows, cols, pattern if use_pattern else None)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    # dense reference: a full trainable weight, gradient read at the selected positions
    w_dense = weight.clone().index_put((rows, cols), delta.detach(), accumulate=True).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, w_dense, bias)
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(delta.grad, w_dense.grad[rows, cols], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_gradcheck_double():
    weight, bias, x, delta, rows, cols, pattern = setup(d_in=6, d_out=5, k=7, tokens=(2, 3), dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x_, d_: sparse_delta_linear(x_, weight, bias, d_, rows, cols, pattern), (x, delta))


def test_frozen_weight_gets_no_gradient_and_sddmm_matches_gather():
    weight, bias, x, delta, rows, cols, pattern = setup(d_in=64, d_out=48, k=300, tokens=(4, 50))
    weight.requires_grad_(False)
    sparse_delta_linear(x, weight, bias, delta, rows, cols, pattern).pow(2).sum().backward()
    assert weight.grad is None
    g, xx = torch.randn(200, 48), torch.randn(200, 64)
    torch.testing.assert_close(sampled_grad(g, xx, rows, cols, pattern), sampled_grad(g, xx, rows, cols, None),
                               rtol=1e-4, atol=1e-4)
