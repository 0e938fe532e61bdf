"""Logical view of a timm vision transformer's parameters.

SPT reasons about *logical* tensors: timm fuses q, k and v into one `attn.qkv` Linear, but the method
scores and structures q, k and v as three separate matrices (and their biases as three vectors).
`ModelLayout` maps every logical tensor to the real parameter and row range that holds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Iterator, Literal

from torch import nn

Role = Literal["matrix", "vector", "other"]

# Linear modules (matched on the end of their qualified name) whose weight may become LoRA / Adapter.
STRUCTURABLE_SUFFIXES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
FUSED_QKV_SUFFIX = "attn.qkv"
QKV_PARTS = ("q", "k", "v")
# Never scored: patch_embed and pos_embed stay frozen, cls_token is always trained.
UNSCORED_PREFIXES = ("patch_embed", "pos_embed", "cls_token", "reg_token", "pos_drop")
ALWAYS_TRAINED = ("cls_token",)


@dataclass(frozen=True)
class LogicalTensor:
    """One tensor as the method sees it: a whole parameter or a row block of a fused one."""

    name: str  # e.g. "blocks.0.attn.q.weight" or "blocks.0.mlp.fc1.weight"
    param: str  # the real parameter, e.g. "blocks.0.attn.qkv.weight"
    shape: tuple[int, ...]  # logical shape
    row_start: int  # first row of the block inside the real parameter (0 when whole)
    role: Role  # matrix (structurable weight), vector (bias / norm), other (never scored)
    module: str  # qualified name of the owning module
    attr: str  # "weight" or "bias" (the attribute on the module)
    part: str  # "q" | "k" | "v" for fused-qkv blocks, "" otherwise

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_whole(self) -> bool:
        return self.part == ""

    @property
    def d_out(self) -> int:
        return self.shape[0]

    @property
    def d_in(self) -> int:
        return self.shape[1]


@dataclass(frozen=True)
class ModelLayout:
    """Every non-head parameter of a model as logical tensors, in the model's parameter order."""

    tensors: tuple[LogicalTensor, ...]
    head_params: int
    head_names: tuple[str, ...]

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelLayout":
        head_names = _head_param_names(model)
        module_of = _owning_modules(model)
        tensors: list[LogicalTensor] = []
        for pname, p in model.named_parameters():
            if pname in head_names:
                continue
            module, _, attr = pname.rpartition(".")
            tensors.extend(_logical_tensors(pname, tuple(p.shape), module, attr, module_of.get(pname)))
        head = sum(p.numel() for n, p in model.named_parameters() if n in head_names)
        return cls(tuple(tensors), head, tuple(sorted(head_names)))

    def __iter__(self) -> Iterator[LogicalTensor]:
        return iter(self.tensors)

    def __getitem__(self, name: str) -> LogicalTensor:
        return self._by_name()[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name()

    def _by_name(self) -> dict[str, LogicalTensor]:
        cache = self.__dict__.get("_cache")
        if cache is None:
            cache = {t.name: t for t in self.tensors}
            object.__setattr__(self, "_cache", cache)
        return cache

    @property
    def scored(self) -> tuple[LogicalTensor, ...]:
        """Tensors that take part in the sensitivity ranking (matrices and vectors)."""
        return tuple(t for t in self.tensors if t.role != "other")

    @property
    def matrices(self) -> tuple[LogicalTensor, ...]:
        return tuple(t for t in self.tensors if t.role == "matrix")

    @property
    def vectors(self) -> tuple[LogicalTensor, ...]:
        return tuple(t for t in self.tensors if t.role == "vector")

    @property
    def always_trained(self) -> tuple[LogicalTensor, ...]:
        return tuple(t for t in self.tensors if t.name in ALWAYS_TRAINED)

    @property
    def scored_params(self) -> tuple[str, ...]:
        """Real parameter names holding at least one scored logical tensor, in model order."""
        seen: dict[str, None] = {}
        for t in self.scored:
            seen.setdefault(t.param, None)
        return tuple(seen)

    @property
    def total_params(self) -> int:
        """Every parameter of the model except the head."""
        return sum(t.numel for t in self.tensors)

    @property
    def signature(self) -> str:
        """Short hash of names and shapes: a plan only applies to a model with the same signature."""
        text = json.dumps([[t.name, list(t.shape)] for t in self.tensors] + [self.head_params])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"tensors": [asdict(t) for t in self.tensors], "head_params": self.head_params,
                "head_names": list(self.head_names)}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelLayout":
        tensors = tuple(LogicalTensor(**{**t, "shape": tuple(t["shape"])}) for t in data["tensors"])
        return cls(tensors, int(data["head_params"]), tuple(data["head_names"]))


def _head_param_names(model: nn.Module) -> set[str]:
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no classification head; SPT needs a timm classifier")
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _owning_modules(model: nn.Module) -> dict[str, nn.Module]:
    owners = {}
    for mname, module in model.named_modules():
        for attr, _ in module.named_parameters(recurse=False):
            owners[f"{mname}.{attr}" if mname else attr] = module
    return owners


def _logical_tensors(pname: str, shape: tuple[int, ...], module: str, attr: str,
                     owner: nn.Module | None) -> list[LogicalTensor]:
    structurable = isinstance(owner, nn.Linear) and module.endswith(STRUCTURABLE_SUFFIXES)
    unscored = pname.startswith(UNSCORED_PREFIXES)
    if unscored:
        role: Role = "other"
    elif structurable and attr == "weight":
        role = "matrix"
    elif len(shape) == 1 and (attr == "bias" or "norm" in module):
        role = "vector"
    else:
        role = "other"
    if structurable and module.endswith(FUSED_QKV_SUFFIX) and shape[0] % 3 == 0:
        rows = shape[0] // 3
        base = module[: -len("qkv")]
        return [LogicalTensor(f"{base}{part}.{attr}", pname, (rows, *shape[1:]), i * rows, role, module, attr, part)
                for i, part in enumerate(QKV_PARTS)]
    return [LogicalTensor(pname, pname, shape, 0, role, module, attr, "")]
