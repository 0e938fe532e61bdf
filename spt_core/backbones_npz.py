"""Google's original ViT ``.npz`` checkpoint format <-> timm VisionTransformer state dicts.

Key layout (optionally under ``opt/target/``): ``embedding/{kernel,bias}`` (kernel HWIO), ``cls``,
``Transformer/posembed_input/pos_embedding``, ``Transformer/encoder_norm/{scale,bias}``, ``head/{kernel,bias}``
and per block ``Transformer/encoderblock_N/`` with ``LayerNorm_0``, ``MultiHeadDotProductAttention_1/
{query,key,value,out}/{kernel,bias}`` (kernels D x heads x head_dim, out heads x head_dim x D),
``LayerNorm_2`` and ``MlpBlock_3/Dense_{0,1}``. Dense kernels are (in, out), the transpose of torch.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

_BLOCK = "Transformer/encoderblock_{i}/"
_MHA = _BLOCK + "MultiHeadDotProductAttention_1/"
_GLOBAL = {  # npz key -> (timm key, transform to torch layout)
    "embedding/kernel": ("patch_embed.proj.weight", lambda a: a.transpose(3, 2, 0, 1)),
    "embedding/bias": ("patch_embed.proj.bias", None),
    "cls": ("cls_token", None),
    "Transformer/posembed_input/pos_embedding": ("pos_embed", None),
    "Transformer/encoder_norm/scale": ("norm.weight", None),
    "Transformer/encoder_norm/bias": ("norm.bias", None),
    "head/kernel": ("head.weight", lambda a: a.T),
    "head/bias": ("head.bias", None),
}
_PER_BLOCK = {  # block-relative npz key -> (block-relative timm key, transform)
    "LayerNorm_0/scale": ("norm1.weight", None),
    "LayerNorm_0/bias": ("norm1.bias", None),
    "LayerNorm_2/scale": ("norm2.weight", None),
    "LayerNorm_2/bias": ("norm2.bias", None),
    "MultiHeadDotProductAttention_1/out/kernel": ("attn.proj.weight", lambda a: a.reshape(-1, a.shape[-1]).T),
    "MultiHeadDotProductAttention_1/out/bias": ("attn.proj.bias", None),
    "MlpBlock_3/Dense_0/kernel": ("mlp.fc1.weight", lambda a: a.T),
    "MlpBlock_3/Dense_0/bias": ("mlp.fc1.bias", None),
    "MlpBlock_3/Dense_1/kernel": ("mlp.fc2.weight", lambda a: a.T),
    "MlpBlock_3/Dense_1/bias": ("mlp.fc2.bias", None),
}
_QKV = ("query", "key", "value")
# The layout each reshaped kernel must have (by key suffix): a file with another layout is named, not crashed on.
_LAYOUTS = {"embedding/kernel": "(patch, patch, 3, width)", "head/kernel": "(width, classes)",
            "Dense_0/kernel": "(width, mlp_dim)", "Dense_1/kernel": "(mlp_dim, width)"}
# Parts of some released files that are not part of the trunk (the SPT reference never loads them).
IGNORED_NPZ_PREFIXES = ("pre_logits/",)


def npz_prefix(keys: set[str]) -> str:
    """'' for plain checkpoints, 'opt/target/' for checkpoints saved with optimizer state."""
    return "opt/target/" if "opt/target/embedding/kernel" in keys else ""


def npz_to_state_dict(arrays: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Convert Google ViT arrays to timm names. Returns (state dict, missing npz keys, unused npz keys)."""
    prefix = npz_prefix(set(arrays))
    arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    depth = 1 + max((int(m.group(1)) for k in arrays if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))),
                    default=-1)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []

    def take(key: str) -> np.ndarray | None:
        if key not in arrays:
            missing.append(prefix + key)
            return None
        used.add(key)
        return arrays[key]

    def put(key: str, timm_key: str, fn) -> None:
        a = take(key)
        if a is None:
            return
        layout = next((v for k, v in _LAYOUTS.items() if key.endswith(k)), None)
        if fn is not None and layout is not None and a.ndim != layout.count(",") + 1:
            raise ValueError(f"Google ViT .npz key {prefix + key} has shape {tuple(a.shape)}, expected {layout}; "
                             "fix: use an original ViT .npz (or a .pth/.safetensors in timm's layout)")
        out[timm_key] = torch.from_numpy(np.ascontiguousarray(fn(a) if fn else a))

    for key, (timm_key, fn) in _GLOBAL.items():
        if key.startswith("head/") and key not in arrays:
            continue  # the head is optional: it is discarded anyway
        put(key, timm_key, fn)
    for i in range(depth):
        base = _BLOCK.format(i=i)
        for key, (timm_key, fn) in _PER_BLOCK.items():
            put(base + key, f"blocks.{i}.{timm_key}", fn)
        mha = _MHA.format(i=i)
        kernels = [take(f"{mha}{n}/kernel") for n in _QKV]
        biases = [take(f"{mha}{n}/bias") for n in _QKV]
        if all(k is not None for k in kernels):
            out[f"blocks.{i}.attn.qkv.weight"] = torch.from_numpy(
                np.concatenate([k.reshape(k.shape[0], -1).T for k in kernels]))
        if all(b is not None for b in biases):
            out[f"blocks.{i}.attn.qkv.bias"] = torch.from_numpy(np.concatenate([b.reshape(-1) for b in biases]))
    unused = sorted(prefix + k for k in set(arrays) - used if not k.startswith(IGNORED_NPZ_PREFIXES))
    return out, missing, unused


def save_npz(model: torch.nn.Module, path: str | Path) -> Path:
    """Write a timm VisionTransformer in Google's original ``.npz`` ViT format (head included)."""
    sd = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    heads = model.blocks[0].attn.num_heads
    arrays: dict[str, np.ndarray] = {}
    inverse = {"embedding/kernel": lambda a: a.transpose(2, 3, 1, 0), "head/kernel": lambda a: a.T}
    for key, (timm_key, _) in _GLOBAL.items():
        if timm_key in sd:
            a = sd[timm_key]
            arrays[key] = inverse[key](a) if key in inverse else a
    for i in range(len(model.blocks)):
        base, p = _BLOCK.format(i=i), f"blocks.{i}."
        for key, (timm_key, _) in _PER_BLOCK.items():
            a = sd[p + timm_key]
            if key.endswith("out/kernel"):
                a = a.T.reshape(heads, -1, a.shape[0])
            elif key.endswith("kernel"):
                a = a.T
            arrays[base + key] = a
        dim = sd[p + "attn.qkv.weight"].shape[1]
        for j, name in enumerate(_QKV):
            w = sd[p + "attn.qkv.weight"][j * dim:(j + 1) * dim]
            arrays[f"{_MHA.format(i=i)}{name}/kernel"] = w.T.reshape(dim, heads, -1)
            arrays[f"{_MHA.format(i=i)}{name}/bias"] = sd[p + "attn.qkv.bias"][j * dim:(j + 1) * dim].reshape(heads, -1)
    path = Path(path)
    with open(path, "wb") as fh:  # a file handle keeps numpy from appending ".npz" to other suffixes
        np.savez(fh, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return path
