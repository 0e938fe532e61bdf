"""Low-bit Gaussian-codebook quantization with a straight-through estimator (1-bit adapters)."""

from __future__ import annotations

import torch

EPS = 1e-5
# Codes of the Lloyd-optimal quantizer of N(0, 1) and the thresholds between them.
CODEBOOKS = {
    1: (torch.tensor([-0.6745, 0.6745]), torch.tensor([0.0])),
    2: (torch.tensor([-1.266, -0.378, 0.378, 1.266]), torch.tensor([-0.822, 0.0, 0.822])),
}


def quantize_codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes as small ints, mean, std) of the per-tensor standardised weight."""
    _, thresholds = CODEBOOKS[bits]
    mean, std = w.mean(), w.std(unbiased=False)
    w_hat = (w - mean) / (std + EPS)
    return torch.bucketize(w_hat, thresholds.to(w.device, w.dtype)), mean, std


def dequantize(codes: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, bits: int) -> torch.Tensor:
    values, _ = CODEBOOKS[bits]
    return values.to(mean.device, mean.dtype)[codes] * std + mean


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def quantize_ste(w: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Forward: exactly the quantized weight (live mean/std); backward: the gradient passes unchanged."""
    if bits is None:
        return w
    codes, mean, std = quantize_codes(w.detach(), bits)
    return _StraightThrough.apply(w, dequantize(codes, mean, std, bits))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Little-endian bit packing of small integer codes into uint8 (8 / bits codes per byte)."""
    per_byte = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per_byte)]).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return (flat << shifts).sum(1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    codes = (packed.reshape(-1, 1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.int64)
