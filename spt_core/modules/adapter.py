"""SPT-Adapter: sequential on a matrix output, h -> h + up(GELU(down(h))), up initialised to zero.

Low-bit adapters quantize both weight matrices (`quantize_weight`; biases stay float) and start the up weight
from small random values, as the paper does (`init_up_weight` says why).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .quant import init_up_weight, maybe_quantize


class Adapter(nn.Module):
    def __init__(self, d_out: int, rank: int, *, bits: int | None = None):
        super().__init__()
        self.down = nn.Linear(d_out, rank)
        self.up = nn.Linear(rank, d_out)
        init_up_weight(self.up.weight, bits)
        nn.init.zeros_(self.up.bias)
        self.bits = bits

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.gelu(F.linear(h, maybe_quantize(self.down.weight, self.bits), self.down.bias))
        return h + F.linear(z, maybe_quantize(self.up.weight, self.bits), self.up.bias)
