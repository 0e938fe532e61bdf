import pytest
import torch
from torch.nn import functional as F

from spt_core.modules import native
from spt_core.modules.sparse import PATH_COUNTS, csr_pattern, merged_in_place, sampled_grad, sparse_delta_linear

CPU_FAST = "native" if native.kernel() is not None else "sddmm"  # what a CPU's bf16 layer should run


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
@pytest.mark.parametrize("tokens,k", [((3, 7), 40), ((1, 2), 10)])
def test_delta_gradient_equals_dense_weight_gradient_at_the_positions(use_pattern, tokens, k):
    weight, bias, x, delta, rows, cols, pattern = setup(tokens=tokens, k=k)
    frozen = weight.clone()
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
    assert torch.equal(weight, frozen)  # merged in place for the forward and the backward, restored bit for bit


def test_in_place_merge_restores_the_weight_on_an_exception_and_allows_a_second_backward():
    weight, bias, x, delta, rows, cols, pattern = setup(k=40)
    frozen = weight.clone()
    with pytest.raises(RuntimeError, match="inside"):
        with merged_in_place(weight, rows, cols, delta.detach() + 1) as w:
            assert w.data_ptr() == weight.data_ptr() and not torch.equal(w, frozen)
            raise RuntimeError("inside")
    assert torch.equal(weight, frozen)
    y = sparse_delta_linear(x, weight, bias, delta, rows, cols, pattern)
    y.sum().backward(retain_graph=True)
    first = delta.grad.clone()
    y.sum().backward()  # the weight's version moved between the two: it is not saved through autograd
    torch.testing.assert_close(delta.grad, 2 * first)
    assert torch.equal(weight, frozen)


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keep_used_cols", [False, True])
@pytest.mark.parametrize("tokens,k", [((4, 50), 300), ((1, 3), 60)])
def test_low_precision_autocast_takes_the_fast_path_with_fp32_accumulation(dtype, keep_used_cols, tokens, k):
    """Under bf16 / fp16 autocast the entry gradients come from the fast kernel (the compiled one where this CPU
    has it, else torch's SDDMM; never the gather fallback),
    equal the dense reference's weight gradient at the K positions at low-precision tolerance, and equal the
    fp64 sum over tokens of the low-precision operands at fp32 tolerance (fp32 accumulation)."""
    weight, bias, x, delta, rows, cols, _ = setup(d_in=64, d_out=48, k=k, tokens=tokens)
    extra = ()
    if keep_used_cols:
        used, local = torch.unique(cols, return_inverse=True)
        pattern, extra = csr_pattern(rows, local, (48, used.numel())), (used, local)
    else:
        pattern = csr_pattern(rows, cols, (48, 64))
    before = dict(PATH_COUNTS)
    with torch.autocast("cpu", dtype=dtype):
        y = sparse_delta_linear(x, weight, bias, delta, rows, cols, pattern, *extra)
    assert y.dtype == dtype
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(upstream)
    assert PATH_COUNTS[CPU_FAST] == before[CPU_FAST] + 1 and PATH_COUNTS["gather"] == before["gather"]
    assert x.grad.dtype == torch.float32 and delta.grad.dtype == torch.float32
    # dense reference: a trainable W + scatter(delta) in the same autocast, gradient read at the K positions
    w_dense = weight.clone().index_put((rows, cols), delta.detach(), accumulate=True).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        y_ref = F.linear(x_ref, w_dense, bias)
    y_ref.backward(upstream)
    tol = dict(rtol=1.6e-2, atol=5e-2)
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    torch.testing.assert_close(delta.grad, w_dense.grad[rows, cols], **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    # brute force: sum over tokens of the operands as the layer saw them (rounded to dtype), in fp64
    g64, x64 = upstream.double().reshape(-1, 48), x.detach().to(dtype).double().reshape(-1, 64)
    exact = (g64[:, rows] * x64[:, cols]).sum(0)
    torch.testing.assert_close(delta.grad.double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", ["native", "sddmm", "gemm", "gather"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_gradient_path_equals_the_brute_force_sum_over_tokens(path, dtype):
    """Each kernel sampled_grad can take (native, sddmm, gemm, the gather fallback), forced here on CPU, against
    the explicit per-entry sum of the same operands in fp64; low-precision operands accumulate in fp32. fp64, or
    a CPU without the compiled kernel, sends "native" on to "sddmm"."""
    _, _, _, _, rows, cols, pattern = setup(d_in=64, d_out=48, k=300)
    gen = torch.Generator().manual_seed(3)
    g, x = torch.randn(500, 48, generator=gen).to(dtype), torch.randn(500, 64, generator=gen).to(dtype)
    brute = torch.stack([(g[:, r].double() * x[:, c].double()).sum() for r, c in zip(rows.tolist(), cols.tolist())])
    before = dict(PATH_COUNTS)
    got = sampled_grad(g, x, rows, cols, pattern, path=path)
    ran = "sddmm" if path == "native" and (dtype == torch.float64 or native.kernel() is None) else path
    assert PATH_COUNTS[ran] == before[ran] + 1
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4}[dtype]
    torch.testing.assert_close(got.double(), brute, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sddmm_over_token_chunks_sums_every_chunk(monkeypatch, dtype):
    """The SDDMM path runs the tokens in chunks (a cache-sized working set); the chunks' sums add up to the
    per-entry sum over all tokens, a last partial chunk included."""
    from spt_core.modules import sparse

    _, _, _, _, rows, cols, pattern = setup(d_in=64, d_out=48, k=300)
    gen = torch.Generator().manual_seed(4)
    g, x = torch.randn(103, 48, generator=gen).to(dtype), torch.randn(103, 64, generator=gen).to(dtype)
    brute = (g.double()[:, rows] * x.double()[:, cols]).sum(0)
    monkeypatch.setattr(sparse, "_SDDMM_CHUNK_BYTES", 10 * (48 + 64) * 4)  # 10 tokens a chunk: 11 chunks
    chunked = sampled_grad(g, x, rows, cols, pattern, path="sddmm")
    torch.testing.assert_close(chunked.double(), brute, rtol=1e-4, atol=1e-4)
    assert torch.equal(pattern.values(), torch.zeros(300))  # the shared pattern is not written to


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_takes_the_gemm_path_and_matches_the_dense_reference():
    weight, bias, x, delta, rows, cols, pattern = (t.cuda() if isinstance(t, torch.Tensor) else t for t in
                                                   setup(d_in=768, d_out=768, k=590, tokens=(8, 197)))
    x, delta = x.detach().requires_grad_(), delta.detach().requires_grad_()
    before = dict(PATH_COUNTS)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = sparse_delta_linear(x, weight, bias, delta, rows, cols, pattern)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    assert PATH_COUNTS["gemm"] == before["gemm"] + 1 and PATH_COUNTS["sddmm"] == before["sddmm"]
    w_dense = weight.clone().index_put((rows, cols), delta.detach(), accumulate=True).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref = F.linear(x.detach(), w_dense, bias)
    y_ref.backward(upstream)
    torch.testing.assert_close(delta.grad, w_dense.grad[rows, cols].float(), rtol=2e-2, atol=2e-1)
