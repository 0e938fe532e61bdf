"""Low-bit weights exactly as the 1-bit adapters paper trains them (PETL-ViT's `QLinear`).

A quantized matrix W is used as q(w_hat) * std + mean, where w_hat = (W - mean) / (std + 1e-5) with the
live per-tensor mean and unbiased std, and q snaps w_hat onto a fixed codebook of 2^bits values. The
codebook is NOT Lloyd-Max: it is the fixed point of the paper's iteration, in which thresholds are the
midpoints of neighbouring values and each value is the N(0, 1) quantile at the middle of its cell's
probability mass (1 bit: +-0.6744898; 2 bits: +-0.3777542, +-1.2657203 with thresholds 0, +-0.8217372).

The gradient is the paper's: straight-through across the rounding only. It still flows through the
standardisation and through mean and std, so it is not a plain pass-through to W. A constant (e.g. all-zero)
W gives every entry the same gradient and never breaks symmetry, which is why quantized up-projections start
from small random values (`init_up_weight`) instead of zeros.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

EPS = 1e-5  # added to std before dividing, as the authors do
CODEBOOK_STEPS = 500  # iterations of the paper's fixed-point construction, from all zeros
MAX_BITS = 8  # codes are packed into bytes, so a code never needs more than 8 bits
UP_INIT_STD = 1e-3  # the authors' quantized up-projection init: N(0, 1e-3) truncated to +-2e-3


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from 1 to {MAX_BITS} (the paper uses 1 or 2), got {bits!r}")


@lru_cache(maxsize=None)
def _codebook64(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.zeros(2 ** bits, dtype=torch.float64)
    thresholds = torch.zeros(2 ** bits - 1, dtype=torch.float64)
    ends = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    for _ in range(CODEBOOK_STEPS):
        thresholds = (values[1:] + values[:-1]) / 2
        cdf = torch.cat([ends[0], torch.special.ndtr(thresholds), ends[1]])
        values = torch.special.ndtri((cdf[1:] + cdf[:-1]) / 2)
    return values, thresholds


def codebook(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2^bits code values, 2^bits - 1 thresholds) in float64, from the paper's fixed-point iteration."""
    _check_bits(bits)
    values, thresholds = _codebook64(bits)
    return values.clone(), thresholds.clone()


@lru_cache(maxsize=64)
def _codebook_on(bits: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    values, thresholds = _codebook64(bits)
    return values.to(device, dtype), thresholds.to(device, dtype)


def _standardise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, std = w.mean(), w.std()  # unbiased (N - 1), as torch's and the authors' default
    return (w - mean) / (std + EPS), mean, std


def _snap(w_hat: torch.Tensor, bits: int) -> torch.Tensor:
    """The code value of each entry; an entry exactly on a threshold gets the midpoint of its two codes,
    which is what the authors' sum of sign steps gives (e.g. 0 at 1 bit)."""
    values, thresholds = _codebook_on(bits, w_hat.device, w_hat.dtype)
    below = torch.bucketize(w_hat, thresholds, right=False)
    above = torch.bucketize(w_hat, thresholds, right=True)
    return (values[below] + values[above]) / 2


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The weight the paper's quantized layer multiplies by: q(w_hat) * std + mean, with its gradient.

    Written as (q + (w_hat - w_hat.detach())) * std + mean: the added term is exactly zero, so the forward value
    is bit-identical to `dequantize(*quantize_codes(w))` (a saved delta reproduces outputs exactly), while
    autograd sees d w_hat through the rounding, as in the authors' `q(w).data + w - w.data`.
    """
    _check_bits(bits)
    w_hat, mean, std = _standardise(w)
    q = _snap(w_hat.detach(), bits)
    return (q + (w_hat - w_hat.detach())) * std + mean


def maybe_quantize(w: torch.Tensor, bits: int | None) -> torch.Tensor:
    """`quantize_weight` for low-bit modules, `w` itself for float ones (bits None)."""
    return w if bits is None else quantize_weight(w, bits)


@torch.no_grad()
def init_up_weight(weight: torch.Tensor, bits: int | None) -> None:
    """Init of a LoRA / Adapter up-projection. Float: zeros, so the branch starts as the identity change.
    Quantized: the authors' small non-zero values (N(0, 1e-3) truncated to +-2e-3), because a constant matrix
    standardises to one value and its entries would get identical gradients forever; such a branch starts
    near, not at, zero (README: quantized plans)."""
    if bits is None:
        nn.init.zeros_(weight)
    else:
        nn.init.trunc_normal_(weight, mean=0.0, std=UP_INIT_STD, a=-2 * UP_INIT_STD, b=2 * UP_INIT_STD)


def quantize_codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes as small ints, mean, std) of a weight, for storage: `dequantize` of them is its forward value."""
    _check_bits(bits)
    w_hat, mean, std = _standardise(w)
    _, thresholds = _codebook_on(bits, w.device, w.dtype)
    return torch.bucketize(w_hat, thresholds), mean, std


def dequantize(codes: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, bits: int) -> torch.Tensor:
    values, _ = _codebook_on(bits, mean.device, mean.dtype)
    return values[codes] * std + mean


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
