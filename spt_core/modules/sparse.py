"""Sparse delta on a frozen Linear weight with an O(K)-memory gradient.

Forward: y = x @ (W + scatter(delta))^T + b, with the scatter done on a weight copy (cheap next to the
activations). Backward: grad_x through the same merged weight, and grad_delta only at the K positions,
grad_delta[j] = sum over tokens of G[:, rows[j]] * X[:, cols[j]], computed as a sampled dense-dense
matmul (SDDMM) on the fixed CSR pattern: no dense weight gradient, no K x K matrix, no full-size state.
Only the input columns the entries touch are needed for grad_delta; given them (`used_cols`), the function keeps
just x[..., used_cols] for the backward instead of the whole input (sensitive entries concentrate in a few
input channels, so this is typically a few percent of it).
"""

from __future__ import annotations

import warnings

import torch
from torch.nn import functional as F

_GATHER_CHUNK = 1 << 22  # max tokens * entries per chunk in the gather fallback


def merged_weight(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return weight.detach().index_put((rows, cols), delta.detach().to(weight.dtype), accumulate=True)


def csr_pattern(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR tensor with the (row-major sorted, unique) positions and zero values: the SDDMM mask."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    values = torch.zeros(rows.numel(), dtype=torch.float32, device=rows.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, size=shape, check_invariants=False)


def sampled_grad(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 pattern: torch.Tensor | None) -> torch.Tensor:
    """sum over tokens of grad_out[:, rows[j]] * x[:, cols[j]] for every j (2-D inputs: tokens x features)."""
    if pattern is not None and grad_out.dtype in (torch.float32, torch.float64):
        pattern = pattern.to(device=grad_out.device, dtype=grad_out.dtype)
        return torch.sparse.sampled_addmm(pattern, grad_out.t(), x, beta=0.0).values()
    g, x = grad_out.float(), x.float()
    step = max(1, _GATHER_CHUNK // max(1, g.shape[0]))
    parts = [(g[:, rows[i:i + step]] * x[:, cols[i:i + step]]).sum(0) for i in range(0, rows.numel(), step)]
    return torch.cat(parts) if parts else g.new_zeros(0)


class SparseDeltaLinear(torch.autograd.Function):
    """y = F.linear(x, W + scatter(rows, cols, delta), bias) with a sampled gradient for delta.

    With `used_cols` (the sorted distinct values of `cols`) and `local_cols` (each entry's position in it), only
    those columns of x are saved for the backward and `pattern` must be laid out over them:
    csr_pattern(rows, local_cols, (d_out, len(used_cols))). A trainable `weight` needs all of x: then x is saved.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, rows, cols, pattern, used_cols=None, local_cols=None):
        w = merged_weight(weight, rows, cols, delta)
        if used_cols is not None and not ctx.needs_input_grad[1]:
            kept, kept_cols = x.index_select(-1, used_cols), local_cols
        else:
            kept, kept_cols = x, cols
            pattern = pattern if used_cols is None else None  # a pattern over used_cols does not fit x
        ctx.save_for_backward(kept, weight, delta, rows, cols, kept_cols)
        ctx.pattern = pattern
        ctx.has_bias = bias is not None
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        kept, weight, delta, rows, cols, kept_cols = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        k2 = kept.reshape(-1, kept.shape[-1])
        grad_x = grad_w = grad_b = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ merged_weight(weight, rows, cols, delta).to(g2.dtype)).reshape(*grad_out.shape[:-1],
                                                                                          weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = (g2.t() @ k2.to(g2.dtype)).to(weight.dtype)  # kept is all of x when the weight trains
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        if ctx.needs_input_grad[3]:
            grad_delta = sampled_grad(g2, k2.to(g2.dtype), rows, kept_cols, ctx.pattern).to(delta.dtype)
        return grad_x, grad_w, grad_b, grad_delta, None, None, None, None, None


def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, delta: torch.Tensor,
                        rows: torch.Tensor, cols: torch.Tensor, pattern: torch.Tensor | None = None,
                        used_cols: torch.Tensor | None = None, local_cols: torch.Tensor | None = None) -> torch.Tensor:
    """See SparseDeltaLinear; `used_cols` / `local_cols` (both or neither) keep only the touched input columns."""
    if (used_cols is None) != (local_cols is None):
        raise ValueError("pass used_cols and local_cols together")
    return SparseDeltaLinear.apply(x, weight, bias, delta, rows, cols, pattern, used_cols, local_cols)
