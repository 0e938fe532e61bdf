"""TuningPlan: what is trained in every logical tensor, with exact parameter and storage accounting."""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .layout import LogicalTensor, ModelLayout

Kind = Literal["sparse", "full", "lora", "adapter"]
STRUCTURED_KINDS = ("lora", "adapter")
FLOAT_BYTES = 4  # deltas are stored as fp32
INDEX_BYTES = 4  # sparse positions as int32
QUANT_STATS_BYTES = 8  # fp32 mean and std per quantized matrix
SUPPORTED_BITS = (1, 2)


def lora_params(d_in: int, d_out: int, rank: int) -> int:
    return rank * (d_in + d_out)


def adapter_params(d_out: int, rank: int) -> int:
    return 2 * d_out * rank + rank + d_out


def structured_params(kind: str, t: LogicalTensor, rank: int) -> int:
    """P_struct of SPT: the cost of tuning matrix `t` with LoRA or an Adapter of this rank."""
    if kind == "lora":
        return lora_params(t.d_in, t.d_out, rank)
    if kind == "adapter":
        return adapter_params(t.d_out, rank)
    raise ValueError(f"unknown structured type {kind!r}; use 'lora' or 'adapter'")


@dataclass(frozen=True)
class TensorPlan:
    """How one logical tensor is tuned. Tensors absent from a plan stay frozen."""

    kind: Kind
    indices: torch.Tensor | None = None  # sparse: sorted flat row-major positions inside the logical tensor
    rank: int = 0  # lora / adapter
    bits: int | None = None  # lora / adapter weights quantized to this many bits (None = float)

    def __post_init__(self) -> None:
        if self.kind == "sparse":
            if self.indices is None or self.indices.ndim != 1:
                raise ValueError("a sparse tensor plan needs a 1-D index tensor")
        elif self.kind in STRUCTURED_KINDS:
            if self.rank < 1:
                raise ValueError(f"rank must be >= 1, got {self.rank}")
            if self.bits is not None and self.bits not in SUPPORTED_BITS:
                raise ValueError(f"bits must be one of {SUPPORTED_BITS} or None, got {self.bits}")
        elif self.kind != "full":
            raise ValueError(f"unknown tensor plan kind {self.kind!r}")

    def params(self, t: LogicalTensor) -> int:
        if self.kind == "sparse":
            return int(self.indices.numel())
        if self.kind == "full":
            return t.numel
        return structured_params(self.kind, t, self.rank)

    def storage_bytes(self, t: LogicalTensor) -> int:
        if self.kind == "sparse":
            return int(self.indices.numel()) * (FLOAT_BYTES + INDEX_BYTES)
        if self.kind == "full" or self.bits is None:
            return self.params(t) * FLOAT_BYTES
        # Quantized: the two weight matrices at `bits` each (+ mean/std), biases stay fp32.
        if self.kind == "lora":
            weights, floats = [t.d_in * self.rank, self.rank * t.d_out], 0
        else:
            weights, floats = [t.d_out * self.rank, self.rank * t.d_out], self.rank + t.d_out
        return sum(math.ceil(n * self.bits / 8) + QUANT_STATS_BYTES for n in weights) + floats * FLOAT_BYTES

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "sparse":
            out["indices_b64"] = _encode_indices(self.indices)
            out["count"] = int(self.indices.numel())
        if self.kind in STRUCTURED_KINDS:
            out["rank"] = self.rank
            out["bits"] = self.bits
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorPlan":
        indices = _decode_indices(data["indices_b64"]) if data["kind"] == "sparse" else None
        return cls(data["kind"], indices, int(data.get("rank", 0)), data.get("bits"))


@dataclass
class TuningPlan:
    """For every logical tensor of a model: frozen (absent) | sparse | full | lora | adapter; plus the head."""

    layout: ModelLayout
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    train_head: bool = True
    lora_dropout: float = 0.1
    lora_drop_path: float = 0.1
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, tp in self.tensors.items():
            if name not in self.layout:
                raise ValueError(f"plan names {name!r}, which the model layout does not have")
            t = self.layout[name]
            if tp.kind in STRUCTURED_KINDS and t.role != "matrix":
                raise ValueError(f"{name} is not a structurable matrix; it cannot take {tp.kind}")
            if tp.kind == "sparse" and tp.indices.numel():
                if int(tp.indices.min()) < 0 or int(tp.indices.max()) >= t.numel:
                    raise ValueError(f"sparse indices of {name} fall outside its {t.numel} entries")
                if tp.indices.numel() > 1 and bool((tp.indices[1:] <= tp.indices[:-1]).any()):
                    raise ValueError(f"sparse indices of {name} must be sorted and unique")

    # ---- accounting -------------------------------------------------------------------------------
    @property
    def trainable_params(self) -> int:
        """Trainable parameters, classification head excluded (cls_token included when tuned)."""
        return sum(tp.params(self.layout[n]) for n, tp in self.tensors.items())

    @property
    def head_params(self) -> int:
        return self.layout.head_params if self.train_head else 0

    @property
    def storage_bytes(self) -> int:
        """Bytes to store the task delta: every tuned value (fp32 or packed bits), sparse positions, head."""
        body = sum(tp.storage_bytes(self.layout[n]) for n, tp in self.tensors.items())
        return body + self.head_params * FLOAT_BYTES

    def count(self, kind: Kind) -> int:
        """Trainable parameters contributed by one kind of tuning."""
        return sum(tp.params(self.layout[n]) for n, tp in self.tensors.items() if tp.kind == kind)

    @property
    def breakdown(self) -> dict[str, int]:
        return {"sparse": self.count("sparse"), "lora": self.count("lora"), "adapter": self.count("adapter"),
                "full": self.count("full"), "head": self.head_params, "total": self.trainable_params}

    def of_kind(self, kind: Kind) -> list[str]:
        return [n for n, tp in self.tensors.items() if tp.kind == kind]

    # ---- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "spt-plan/1",
            "layout": self.layout.to_dict(),
            "tensors": {n: tp.to_dict() for n, tp in self.tensors.items()},
            "train_head": self.train_head,
            "lora_dropout": self.lora_dropout,
            "lora_drop_path": self.lora_drop_path,
            "meta": self.meta,
            "trainable_params": self.trainable_params,
            "storage_bytes": self.storage_bytes,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TuningPlan":
        if data.get("format") != "spt-plan/1":
            raise ValueError(f"not an spt-plan/1 document (format={data.get('format')!r})")
        return cls(
            layout=ModelLayout.from_dict(data["layout"]),
            tensors={n: TensorPlan.from_dict(d) for n, d in data["tensors"].items()},
            train_head=bool(data["train_head"]),
            lora_dropout=float(data["lora_dropout"]),
            lora_drop_path=float(data["lora_drop_path"]),
            meta=dict(data.get("meta", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> "TuningPlan":
        return cls.from_dict(json.loads(text))

    # ---- humans -----------------------------------------------------------------------------------
    def summary(self) -> str:
        """A per-block table: how every matrix is tuned, whole vectors, sparse entries, parameters."""
        kinds = ["q", "k", "v", "proj", "fc1", "fc2"]
        rows: dict[str, dict[str, Any]] = {}
        for name, tp in self.tensors.items():
            t = self.layout[name]
            row = rows.setdefault(block_of(name), {"cells": {}, "vectors": 0, "sparse": 0, "params": 0})
            row["params"] += tp.params(t)
            if tp.kind == "sparse":
                row["sparse"] += tp.params(t)
            if t.role == "matrix":
                mk = matrix_kind(t)
                cell = {"lora": f"L{tp.rank}", "adapter": f"A{tp.rank}", "full": "F"}.get(tp.kind, f"s{tp.params(t)}")
                row["cells"][mk] = cell + (f"/{tp.bits}b" if tp.bits else "")
            elif tp.kind == "full":
                row["vectors"] += 1
        header = f"{'block':<10}" + "".join(f"{k:>8}" for k in kinds) + f"{'vectors':>9}{'sparse':>9}{'params':>10}"
        lines = [header]
        for block in sorted(rows, key=_block_sort_key):
            r = rows[block]
            cells = "".join(f"{r['cells'].get(k, '-'):>8}" for k in kinds)
            lines.append(f"{block:<10}{cells}{r['vectors']:>9}{r['sparse']:>9}{r['params']:>10}")
        b = self.breakdown
        lines.append(f"total {b['total']:,} trainable (sparse {b['sparse']:,}, lora {b['lora']:,}, adapter "
                     f"{b['adapter']:,}, full {b['full']:,}) + head {b['head']:,}; "
                     f"delta {self.storage_bytes / 1024:.1f} KiB")
        return "\n".join(lines)


_BLOCK_RE = re.compile(r"^((?:layers|stages)\.\d+\.)?blocks\.\d+")


def block_of(name: str) -> str:
    """`blocks.3` for anything inside block 3; the top-level name otherwise (cls_token, norm, ...)."""
    m = _BLOCK_RE.match(name)
    return m.group(0) if m else name.split(".")[0]


def matrix_kind(t: LogicalTensor) -> str:
    """q | k | v | proj | fc1 | fc2 (the module's last name for other matrices)."""
    return t.part or t.module.rsplit(".", 1)[-1]


def _block_sort_key(block: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.]", block))


def _encode_indices(indices: torch.Tensor) -> str:
    dtype = np.int32 if indices.numel() == 0 or int(indices.max()) < 2**31 else np.int64
    arr = indices.cpu().numpy().astype("<" + np.dtype(dtype).str[1:])
    return f"{np.dtype(dtype).name}:" + base64.b64encode(arr.tobytes()).decode()


def _decode_indices(text: str) -> torch.Tensor:
    dtype, _, payload = text.partition(":")
    arr = np.frombuffer(base64.b64decode(payload), dtype=np.dtype(dtype).newbyteorder("<"))
    return torch.from_numpy(arr.astype(np.int64))
