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


class LoRA(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, *, dropout: float = 0.1, drop_path: float = 0.1,
                 bits: int | None = None):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        init_up_weight(self.up.weight, bits)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), maybe_quantize(self.down.weight, self.bits))
        return self.drop_path(F.linear(h, maybe_quantize(self.up.weight, self.bits)))

    def delta_weight(self) -> torch.Tensor:
        """The (d_out, d_in) update this branch adds to the frozen weight (no alpha/r scaling in SPT)."""
        return maybe_quantize(self.up.weight, self.bits) @ maybe_quantize(self.down.weight, self.bits)
