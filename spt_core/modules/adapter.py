"""SPT-Adapter: sequential on a matrix output, h -> h + up(GELU(down(h))), up initialised to zero."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .quant import quantize_ste


class Adapter(nn.Module):
    def __init__(self, d_out: int, rank: int, *, bits: int | None = None):
        super().__init__()
        self.down = nn.Linear(d_out, rank)
        self.up = nn.Linear(rank, d_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.bits = bits

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.gelu(F.linear(h, quantize_ste(self.down.weight, self.bits), self.down.bias))
        return h + F.linear(z, quantize_ste(self.up.weight, self.bits), self.up.bias)
