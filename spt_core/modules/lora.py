"""SPT-LoRA branch: x -> dropout -> down (Kaiming) -> up (zero) -> drop-path, added to the frozen output.

Low-bit branches (bits 1 or 2) multiply by the paper's quantized weights (`quantize_weight`) and start their
up-projection from small random values, as the authors do (`init_up_weight` says why).
"""

from __future__ import annotations

import math

import torch
from timm.layers import DropPath
from torch import nn
from torch.nn import functional as F

from .quant import init_up_weight, maybe_quantize
from .sparse import compute_dtype


# Devices whose native_dropout is one fused kernel (mask and output in one pass); elsewhere (CPU) a one-byte
# mask is drawn and applied by hand, 2-3x faster than native_dropout there.
FUSED_DROPOUT = {"cuda"}


class _DropoutLinear(torch.autograd.Function):
    """F.linear(dropout(x), weight), keeping the dropped input (in the product's dtype, as F.linear would) and a
    one-byte mask for the backward. F.dropout on a CPU keeps its mask in the input's dtype, so a float32 branch
    held 8 bytes an element for its input there (mask and dropped copy); this holds 5 (3 under bf16, as the
    fused CUDA dropout did)."""

    @staticmethod
    def forward(ctx, x, weight, p):
        dtype = compute_dtype(x, weight)
        ctx.fused = x.device.type in FUSED_DROPOUT
        if ctx.fused:
            dropped, mask = torch.native_dropout(x, p, True)
        else:
            mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
            dropped = x.mul(mask).mul_(1 / (1 - p))
        dropped = dropped.to(dtype)
        ctx.save_for_backward(dropped, mask, weight)
        ctx.scale, ctx.x_dtype = 1 / (1 - p), x.dtype
        return F.linear(dropped, weight.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        dropped, mask, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.to(grad_out.dtype)).to(ctx.x_dtype)
            grad_x = (torch.ops.aten.native_dropout_backward(grad_x, mask, ctx.scale) if ctx.fused else
                      grad_x.mul_(mask).mul_(ctx.scale))
        if ctx.needs_input_grad[1]:
            g2, d2 = grad_out.reshape(-1, grad_out.shape[-1]), dropped.reshape(-1, dropped.shape[-1])
            grad_w = (g2.t() @ d2.to(g2.dtype)).to(weight.dtype)
        return grad_x, grad_w, None


class DropoutLinear(nn.Module):
    """The branch's input dropout fused with its down product: F.linear(dropout(x, p), weight)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return F.linear(x, weight)
        return _DropoutLinear.apply(x, weight, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LoRA(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, *, dropout: float = 0.1, drop_path: float = 0.1,
                 bits: int | None = None):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        init_up_weight(self.up.weight, bits)
        self.dropout = DropoutLinear(dropout)  # applied with the down product: self.dropout(x, down)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.bits = bits

    def down_weight(self) -> torch.Tensor:
        """The (rank, d_in) matrix the branch multiplies by (quantized for low-bit branches)."""
        return maybe_quantize(self.down.weight, self.bits)

    def up_weight(self) -> torch.Tensor:
        return maybe_quantize(self.up.weight, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branch on its own; TunedLinear runs all branches of one matrix together (`fused_lora`)."""
        return self.drop_path(F.linear(self.dropout(x, self.down_weight()), self.up_weight()))

    def delta_weight(self) -> torch.Tensor:
        """The (d_out, d_in) update this branch adds to the frozen weight (no alpha/r scaling in SPT)."""
        return self.up_weight() @ self.down_weight()


def fused_lora(y: torch.Tensor, x: torch.Tensor, parts: dict[str, int], branches: dict[str, LoRA]) -> torch.Tensor:
    """y + every LoRA branch of one matrix (q, k, v slices of a fused qkv, or the whole), in one pass.

    Separate branches would each draw a dropout of x, run their own down and up products, and be concatenated
    into the output's row slices. Here there is one dropout of x, one down product with the stacked
    [sum of ranks, d_in] matrix, and the up product with a block-diagonal [d_out, sum of ranks] matrix (zero rows
    for slices without a branch) fused into the addition (addmm). Drop-path scales whole samples, so it is
    applied to the small rank-sized activations before the up product instead of to the output. Branches of
    one matrix share the dropout probability, drop-path rate and draws (a plan sets them once), as PEFT's
    LoRA on a fused qkv does; with the same weights and draws the result equals the separate branches'.
    """
    active = [branches[p] for p in parts if p in branches]
    first = active[0]
    down = torch.cat([b.down_weight() for b in active]) if len(active) > 1 else first.down_weight()
    h = first.drop_path(first.dropout(x, down))
    up = torch.block_diag(*(branches[p].up_weight() if p in branches else first.up.weight.new_zeros(rows, 0)
                            for p, rows in parts.items())) if len(parts) > 1 else first.up_weight()
    flat = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]).to(y.dtype), up.t().to(y.dtype))
    return flat.view(y.shape)
