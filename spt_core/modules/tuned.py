"""Drop-in replacements for Linear and LayerNorm that add SPT's trainable parts to frozen weights.

Both keep the original `weight` / `bias` Parameter objects under the same names, so the frozen weights are
the very tensors the backbone loaded (bit-identical) and state-dict keys do not move.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .adapter import Adapter
from .lora import LoRA, fused_lora
from .sparse import csr_pattern, merged_weight, sparse_delta_linear

WHOLE = "w"  # part name of an unsplit matrix; fused qkv uses "q", "k", "v"


class VectorDelta(nn.Module):
    """A trainable delta at fixed positions of a frozen vector (sparse picks, or a whole q/k/v third)."""

    def __init__(self, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index.to(torch.int64), persistent=False)
        self.delta = nn.Parameter(torch.zeros(index.numel()))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base.index_add(0, self.index, self.delta.to(base.dtype))


class TunedLinear(nn.Linear):
    """Frozen Linear + sparse weight delta + bias delta + LoRA / Adapter per row block (q, k, v or whole)."""

    def __init__(self, base: nn.Linear, parts: dict[str, int]):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.parts = dict(parts)  # part -> rows, in output order
        self.lora = nn.ModuleDict()
        self.adapter = nn.ModuleDict()
        self.bias_delta: VectorDelta | None = None
        self.register_parameter("sparse_delta", None)
        self.register_buffer("sparse_rows", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.register_buffer("sparse_cols", torch.zeros(0, dtype=torch.int64), persistent=False)
        # The distinct input columns the sparse entries touch and each entry's index into them; set when they
        # are at most half of the input, so the backward keeps x[..., used_cols] instead of all of x.
        self.register_buffer("sparse_used_cols", None, persistent=False)
        self.register_buffer("sparse_local_cols", None, persistent=False)
        self._pattern: torch.Tensor | None = None

    # ---- building -----------------------------------------------------------------------------------
    def set_sparse(self, flat: torch.Tensor) -> None:
        """Train the weight entries at these flat row-major positions (sorted, unique)."""
        flat = flat.to(self.weight.device, torch.int64)
        self.sparse_rows = torch.div(flat, self.in_features, rounding_mode="floor")
        self.sparse_cols = flat % self.in_features
        used, local = torch.unique(self.sparse_cols, return_inverse=True)
        keep_few = 0 < used.numel() <= self.in_features // 2
        self.sparse_used_cols = used if keep_few else None
        self.sparse_local_cols = local if keep_few else None
        self.sparse_delta = nn.Parameter(torch.zeros(flat.numel(), device=self.weight.device))
        self._pattern = None

    def set_bias_delta(self, index: torch.Tensor) -> None:
        self.bias_delta = VectorDelta(index).to(self.weight.device)

    def add_lora(self, part: str, rank: int, *, dropout: float, drop_path: float, bits: int | None) -> None:
        self.lora[part] = LoRA(self.in_features, self.parts[part], rank, dropout=dropout, drop_path=drop_path,
                               bits=bits).to(self.weight.device)

    def add_adapter(self, part: str, rank: int, *, bits: int | None) -> None:
        self.adapter[part] = Adapter(self.parts[part], rank, bits=bits).to(self.weight.device)

    # ---- running ------------------------------------------------------------------------------------
    def _bias(self) -> torch.Tensor | None:
        if self.bias_delta is None:
            return self.bias
        return self.bias_delta(self.bias)

    def _sparse_pattern(self) -> torch.Tensor | None:
        if self._pattern is None or self._pattern.device != self.weight.device:
            if self.sparse_used_cols is None:
                self._pattern = csr_pattern(self.sparse_rows, self.sparse_cols, tuple(self.weight.shape))
            else:
                self._pattern = csr_pattern(self.sparse_rows, self.sparse_local_cols,
                                            (self.out_features, self.sparse_used_cols.numel()))
        return self._pattern

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._bias()
        if self.sparse_delta is not None:
            y = sparse_delta_linear(x, self.weight, bias, self.sparse_delta, self.sparse_rows, self.sparse_cols,
                                    self._sparse_pattern(), self.sparse_used_cols, self.sparse_local_cols)
        else:
            y = F.linear(x, self.weight, bias)
        if self.lora:
            y = fused_lora(y, x, self.parts, dict(self.lora.items()))
        if not self.adapter:
            return y
        chunks = list(y.split(list(self.parts.values()), dim=-1))
        for i, part in enumerate(self.parts):
            if part in self.adapter:
                chunks[i] = self.adapter[part](chunks[i])
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)

    # ---- inference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merged(self) -> nn.Module:
        """Sparse, bias and LoRA deltas folded into the weight; adapters (nonlinear) stay as modules."""
        w = self.weight.detach().clone()
        if self.sparse_delta is not None:
            w = merged_weight(w, self.sparse_rows, self.sparse_cols, self.sparse_delta)
        start = 0
        for part, rows in self.parts.items():
            if part in self.lora:
                w[start:start + rows] += self.lora[part].delta_weight().to(w.dtype)
            start += rows
        bias = self._bias()
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        linear.weight.copy_(w)
        if bias is not None:
            linear.bias.copy_(bias)
        if not self.adapter:
            return linear
        out = TunedLinear(linear, self.parts)
        out.adapter = self.adapter
        return out


class TunedLayerNorm(nn.LayerNorm):
    """Frozen LayerNorm whose weight and / or bias carry trainable deltas at fixed positions."""

    def __init__(self, base: nn.LayerNorm):
        nn.Module.__init__(self)
        self.normalized_shape, self.eps = base.normalized_shape, base.eps
        self.elementwise_affine = base.elementwise_affine
        self.weight, self.bias = base.weight, base.bias
        self.deltas = nn.ModuleDict()

    def set_delta(self, attr: str, index: torch.Tensor) -> None:
        self.deltas[attr] = VectorDelta(index).to(getattr(self, attr).device)

    def _effective(self, attr: str) -> torch.Tensor | None:
        base = getattr(self, attr)
        return self.deltas[attr](base) if attr in self.deltas else base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self._effective("weight"), self._effective("bias"), self.eps)

    @torch.no_grad()
    def merged(self) -> nn.LayerNorm:
        out = nn.LayerNorm(self.normalized_shape, eps=self.eps, device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self._effective("weight"))
        out.bias.copy_(self._effective("bias"))
        return out
