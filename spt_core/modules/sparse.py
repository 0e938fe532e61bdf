"""Sparse delta on a frozen Linear weight with an O(K)-memory gradient.

Forward: y = x @ (W + scatter(delta))^T + b. In the weight's own dtype (fp32 training) the K sums are written
into the frozen weight itself for the product and the K original values written back after it, bit for bit
(`merged_in_place`: O(K) work, no weight-sized copy); under autocast the merged weight is the cast copy a plain
Linear makes anyway, with the K sums written into it. Backward: grad_x = G @ (W + scatter(delta)) the same way,
and grad_delta only at the K positions,
grad_delta[j] = sum over tokens of G[:, rows[j]] * X[:, cols[j]]: no dense weight gradient is kept, no K x K
matrix, no full-size state. Only the input columns the entries touch are needed for grad_delta; given them
(`used_cols`), the function keeps just x[..., used_cols] for the backward instead of the whole input
(sensitive entries concentrate in a few input channels, so this is typically a few percent of it).

The K sums come from one of two kernels (FAST_PATH, by device). The sampled dense-dense matmul (SDDMM) on the
fixed CSR pattern does K dot products over the tokens, after laying both operands out token-contiguous (widening
bf16 / fp16 to fp32 in the same pass: fp32 accumulation). CUDA takes the dense product G^T X[:, used_cols], then
a gather of the K entries (cuBLAS on the operands as they are, fp32 accumulation and output): on an H200 at
ViT-B/16 shapes and batch 64 it took 36-105 us a layer at full width against about 275 us for cuSPARSE's sampled
matmul plus its two transposing copies (bench/gpu/); it costs d_out x n_used multiply-adds a token, so it shrinks
with the kept columns, and its result is one d_out x n_used buffer, freed at once. A CPU takes the SDDMM: it was
faster on wide inputs at low fill, and where the kept columns are few the two swapped places from run to run
(`python bench/run.py --quick` times both: raw.path_costs). On a CPU with AVX-512 the SDDMM is our compiled
kernel (spt_core.modules.native: torch's needs two transposing copies that cost more than its dot products),
elsewhere torch's. The per-entry gather is only a fallback (no pattern on a CPU, or a device with neither
kernel); `PATH_COUNTS` records which kernel ran.

Under bf16 / fp16 autocast the layer runs in the autocast dtype like a plain Linear (merged copy built in that
dtype and kept for the backward, the input cast once and saved in it); the entry gradients still accumulate
in fp32.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext

import torch
from torch.nn import functional as F

from . import native

_GATHER_CHUNK = 1 << 22  # max tokens * entries per chunk in the gather fallback
# Tokens go through the SDDMM kernel in chunks whose laid-out fp32 operands take at most this many bytes, so the
# transient copies stay cache-sized whatever the batch (one pass at batch 64 and fc1's shape would lay out 190 MB);
# bench/run.py's sparse layer figure was the same within noise with and without chunks.
_SDDMM_CHUNK_BYTES = 1 << 22
# The fastest measured way to the K entry gradients, by device type (bench/figures/sparse_grad.py on CPU,
# bench/gpu_grad_paths.py on CUDA); a device not listed takes the gather fallback.
FAST_PATH = {"cpu": "native", "cuda": "gemm"}
# Which kernel `sampled_grad` ran, by name: the bench and the tests read it to check the fast path is taken.
PATH_COUNTS: dict[str, int] = {"native": 0, "sddmm": 0, "gemm": 0, "gather": 0}


def merged_weight(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """W + scatter(delta) as a new tensor in `dtype` (default: the weight's). The K sums are formed in the
    weight's precision and rounded once, so a bf16 result equals bf16(W + scatter(delta)) of a dense weight.
    Positions are unique (TunedLinear.set_sparse's contract)."""
    w = weight.detach()
    merged = w.to(dtype or w.dtype, copy=True)
    sums = w[rows, cols] + delta.detach().to(w.dtype)
    return merged.index_put_((rows, cols), sums.to(merged.dtype))


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a plain F.linear would multiply in here: the autocast dtype where autocast is on (and casts
    this input), else the input's."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(kind)
    return x.dtype


def csr_pattern(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR tensor with the (row-major sorted, unique) positions and zero values: the SDDMM mask."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    values = torch.zeros(rows.numel(), dtype=torch.float32, device=rows.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, size=shape, check_invariants=False)


def sampled_grad(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 pattern: torch.Tensor | None, path: str | None = None) -> torch.Tensor:
    """sum over tokens of grad_out[:, rows[j]] * x[:, cols[j]] for every j (2-D inputs: tokens x features).

    `path` (default: FAST_PATH for the device) picks the kernel:
    - "native" (needs `pattern`): the compiled CPU kernel (spt_core.modules.native), which lays out tiles of
      tokens in cache and widens in registers; "sddmm" where it is not built or the operands do not suit it.
    - "sddmm" (needs `pattern`): the kernel reads rows of grad_out^T and of x^T; both are laid out that way
      (contiguous) in one copy that also widens bf16 / fp16 to fp32 (the kernel has no low-precision version,
      and fp32 accumulation is what the dense bf16 GEMM does too), a chunk of tokens at a time, the chunks'
      sums accumulating in the kernel's output. fp64 stays fp64.
    - "gemm": the dense product grad_out^T x, then the K entries. On CUDA low-precision operands go in as they
      are and the GEMM accumulates and writes fp32 (mm's out_dtype); on a CPU they are widened to fp32 first.
    - "gather": chunks of K gathered columns, in fp32.
    The result is in the accumulation dtype (fp32, or fp64 for fp64 inputs).
    """
    acc = torch.float64 if torch.float64 in (grad_out.dtype, x.dtype) else torch.float32
    path = path or FAST_PATH.get(grad_out.device.type, "gather")
    if path == "native":
        lib = native.kernel() if pattern is not None and native.supports(grad_out, x) else None
        if lib is not None:
            PATH_COUNTS["native"] += 1
            return native.sampled_grad_native(lib, grad_out, x, pattern)
        path = "sddmm"
    if path == "gemm":
        PATH_COUNTS["gemm"] += 1
        return _product_acc(grad_out.t(), x, acc)[rows, cols].to(acc)
    if path == "sddmm" and pattern is not None:
        out = pattern.to(device=grad_out.device, dtype=acc)
        step = max(1, _SDDMM_CHUNK_BYTES // ((grad_out.shape[1] + x.shape[1]) * acc.itemsize))
        for t in range(0, grad_out.shape[0], step):
            g_t = grad_out[t:t + step].t().to(acc, memory_format=torch.contiguous_format)
            x_t = x[t:t + step].t().to(acc, memory_format=torch.contiguous_format)
            out = torch.sparse.sampled_addmm(out, g_t, x_t.t(), beta=1.0 if t else 0.0)  # later chunks add on
        PATH_COUNTS["sddmm"] += 1
        return out.values() if grad_out.shape[0] else torch.zeros_like(out.values())
    PATH_COUNTS["gather"] += 1
    g, x = grad_out.to(acc), x.to(acc)
    step = max(1, _GATHER_CHUNK // max(1, g.shape[0]))
    parts = [(g[:, rows[i:i + step]] * x[:, cols[i:i + step]]).sum(0) for i in range(0, rows.numel(), step)]
    return torch.cat(parts) if parts else g.new_zeros(0)


def _product_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b with fp32 (or fp64) accumulation and result. On CUDA low-precision operands stay as they are
    (tensor cores, fp32 output); elsewhere they are widened first (in their own layout: no transposing copy),
    as no CPU GEMM writes fp32 from bf16."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm's out_dtype: rounds once to the operands' dtype
            return a @ b
    return a.to(acc) @ b.to(acc)


@contextmanager
def merged_in_place(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor):
    """The frozen weight itself with delta added at its K positions for the duration of the block, then the
    K original values written back, bit for bit (also on an exception): O(K) work where `merged_weight` copies
    the whole matrix. Only for a weight that does not train, used in its own dtype, and never saved for a
    backward through autograd (each merge and restore bumps its version counter)."""
    w = weight.detach()
    with torch.no_grad():
        original = w[rows, cols]
        w.index_put_((rows, cols), original + delta.detach().to(w.dtype))
        try:
            yield w
        finally:
            w.index_put_((rows, cols), original)


def _times_merged(a: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  delta: torch.Tensor, kept: torch.Tensor | None, transpose: bool, bias: torch.Tensor | None = None):
    """a @ (W + scatter(delta))^T (+ bias) if `transpose`, else a @ (W + scatter(delta)), in a's dtype: with the
    merged copy `kept` if there is one, else merging into a frozen weight of a's dtype in place, else a copy."""
    if kept is not None:
        merged = nullcontext(kept)
    elif a.dtype == weight.dtype and not weight.requires_grad:
        merged = merged_in_place(weight, rows, cols, delta)
    else:
        merged = nullcontext(merged_weight(weight, rows, cols, delta, a.dtype))
    with merged as w:
        return F.linear(a, w, bias) if transpose else a @ w


class SparseDeltaLinear(torch.autograd.Function):
    """y = F.linear(x, W + scatter(rows, cols, delta), bias) with a sampled gradient for delta.

    With `used_cols` (the sorted distinct values of `cols`) and `local_cols` (each entry's position in it), only
    those columns of x are saved for the backward and `pattern` must be laid out over them:
    csr_pattern(rows, local_cols, (d_out, len(used_cols))). A trainable `weight` needs all of x: then x is saved.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, rows, cols, pattern, used_cols=None, local_cols=None):
        dtype = compute_dtype(x, weight)  # autocast is on inside forward: follow it explicitly, casting once
        x_c = x.to(dtype)
        if used_cols is not None and not ctx.needs_input_grad[1]:
            kept, kept_cols = x_c.index_select(-1, used_cols), local_cols
        else:
            kept, kept_cols = x_c, cols
            pattern = pattern if used_cols is None else None  # a pattern over used_cols does not fit x
        # Under autocast the low-precision merged copy is kept for the backward, as autocast keeps the cast
        # weight of a plain Linear (half the bytes of the weight); in the weight's own dtype the backward merges
        # again (in place: O(K)) instead of holding a weight-sized copy.
        w = merged_weight(weight, rows, cols, delta, dtype) if dtype != weight.dtype else None
        ctx.save_for_backward(kept, delta, rows, cols, kept_cols, w)
        ctx.weight = weight  # not through save_for_backward: merging in place bumps its version counter
        ctx.pattern, ctx.x_dtype = pattern, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _times_merged(x_c, weight, rows, cols, delta, w, True, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        kept, delta, rows, cols, kept_cols, w = ctx.saved_tensors
        weight = ctx.weight
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        k2 = kept.reshape(-1, kept.shape[-1])
        grad_x = grad_w = grad_b = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = _times_merged(g2, weight, rows, cols, delta, None if w is None else w.to(g2.dtype), False)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g2.t() @ k2.to(g2.dtype)).to(weight.dtype)  # kept is all of x when the weight trains
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0, dtype=torch.promote_types(ctx.bias_dtype, torch.float32)).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3]:
            grad_delta = sampled_grad(g2, k2, rows, kept_cols, ctx.pattern).to(delta.dtype)
        return grad_x, grad_w, grad_b, grad_delta, None, None, None, None, None


def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, delta: torch.Tensor,
                        rows: torch.Tensor, cols: torch.Tensor, pattern: torch.Tensor | None = None,
                        used_cols: torch.Tensor | None = None, local_cols: torch.Tensor | None = None) -> torch.Tensor:
    """See SparseDeltaLinear; `used_cols` / `local_cols` (both or neither) keep only the touched input columns."""
    if (used_cols is None) != (local_cols is None):
        raise ValueError("pass used_cols and local_cols together")
    return SparseDeltaLinear.apply(x, weight, bias, delta, rows, cols, pattern, used_cols, local_cols)
