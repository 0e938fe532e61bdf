"""Tuning modules: sparse deltas, LoRA, Adapter, low-bit quantization, and the Linear/LayerNorm that host them."""

from .adapter import Adapter
from .lora import LoRA
from .quant import codebook, dequantize, quantize_codes, quantize_weight
from .sparse import sampled_grad, sparse_delta_linear
from .tuned import TunedLayerNorm, TunedLinear, VectorDelta

__all__ = ["Adapter", "LoRA", "TunedLayerNorm", "TunedLinear", "VectorDelta", "codebook", "dequantize",
           "quantize_codes", "quantize_weight", "sampled_grad", "sparse_delta_linear"]
