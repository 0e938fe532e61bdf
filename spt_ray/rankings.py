"""The ranking trials need, derived from a sensitivity map tensor by tensor, exact for a whole search space.

Why per tensor: SPT's allocation walks the global ranking and, for each logical tensor, only its first
`threshold` entries change the plan (ceil(P_struct / alpha) for a matrix, ceil(numel / beta) for a vector).
An entry below its tensor's threshold adds one sparse parameter, the threshold-th switches the tensor, and
every later entry of that tensor adds nothing (also for a tensor kept sparse, "capped"). So the global
ranking restricted to each tensor's top `depth` entries, with depth >= every threshold the search space can
produce (largest rank, smallest alpha, every structured type), walks through exactly the same totals as
the full ranking minus steps of zero: `allocate` returns the same plan for ANY budget of the space,
including budgets at or beyond what the model can absorb, which a prefix of the global ranking can only
serve by reaching the least sensitive tensors (the "deep corners" that made trials read the full map).
Only `plan.meta["num_top_entries"]` differs: it counts the entries of the ranking it was given.

For ViT-B/16 and the VTAB space (ranks up to 16, alpha from 2, margin 1.25) that is 2.0 M of 85 M entries
(3.5% of the fp32 map's bytes as int32 ids + bfloat16 scores); for ViT-L/16 5.3 M of 302 M (2.7%). Derivation reads the map one
logical tensor at a time (straight from its safetensors file, never whole), takes each tensor's top entries
with torch.topk (ties by lower id, as `Ranking.from_scores`), and sorts the union: memory is one tensor
plus the result, time is one pass of topk.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from spt_core.layout import ModelLayout
from spt_core.plan import structured_params
from spt_core.sensitivity import Ranking, SensitivityMap

from .storage import Storage

# (start id, scores of one logical tensor, flat row-major, float32) in ranking-id order
ScoreStream = Callable[[], Iterator[tuple[int, torch.Tensor]]]
CHUNK = 16 * 2**20  # bytes hashed per read when checking a file's sha256
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def switch_depths(layout: ModelLayout, structured: tuple[str, ...], rank: int, alpha: float,
                  beta: float) -> torch.Tensor:
    """Per scored logical tensor (layout order): the entries allocation can use, its switch threshold
    (as `spt_core.allocate`: max(1, ceil(P_struct / alpha)) for a matrix, the largest over `structured`;
    max(1, ceil(numel / beta)) for a vector), capped at the tensor's size."""
    out = []
    for t in layout.scored:
        if t.role == "matrix":
            thr = max(math.ceil(structured_params(s, t, rank) / alpha) for s in structured)
        else:
            thr = math.ceil(t.numel / beta)
        out.append(min(t.numel, max(1, thr)))
    return torch.tensor(out, dtype=torch.int64)


def covers(ranking: Ranking, structured: str, rank: int, alpha: float, beta: float = 5.0) -> bool:
    """Whether allocating (structured, rank, alpha, beta) over `ranking` gives the full map's plan: true for
    a complete ranking, and for a per-tensor ranking whose depths reach every threshold of this config."""
    if not ranking.truncated:
        return True
    depths = ranking.meta.get("tensor_depths")
    if depths is None:  # a prefix of the global ranking: no per-tensor guarantee
        return False
    need = switch_depths(ranking.layout, (structured,), rank, alpha, beta)
    return bool((torch.as_tensor(depths) >= need).all())


# ---- score streams: a map in memory, or its safetensors file read one tensor at a time ---------------------
def map_stream(smap: SensitivityMap) -> ScoreStream:
    def stream() -> Iterator[tuple[int, torch.Tensor]]:
        start = 0
        for t in smap.layout.scored:
            yield start, smap.logical(t.name).reshape(-1).float().cpu()
            start += t.numel
    return stream


class MapFile:
    """A stored map's safetensors file, open once (a replaced file cannot change under a reader): its sha256
    in chunks, and each logical tensor's rows read on their own, so the map is never whole in memory."""

    def __init__(self, storage: Storage, path: str, layout: ModelLayout):
        self.fh = storage.fs.open_input_file(path)
        self.layout = layout
        (size,) = struct.unpack("<Q", bytes(self.fh.read_at(8, 0)))  # read_at: bytes or a pyarrow Buffer
        self.header: dict[str, Any] = json.loads(bytes(self.fh.read_at(size, 8)))
        self.data_start = 8 + size

    def __enter__(self) -> "MapFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.fh.close()

    def sha256(self) -> str:
        digest, offset, size = hashlib.sha256(), 0, self.fh.size()
        while offset < size:
            digest.update(self.fh.read_at(min(CHUNK, size - offset), offset))
            offset += CHUNK
        return digest.hexdigest()

    def stream(self) -> Iterator[tuple[int, torch.Tensor]]:
        start = 0
        for t in self.layout.scored:
            info = self.header.get(t.param)
            if info is None or info["dtype"] not in _DTYPES:
                raise ValueError(f"the map file has no readable {t.param!r} ({info and info['dtype']})")
            dtype = np.dtype(_DTYPES[info["dtype"]])
            row = int(np.prod(info["shape"][1:], dtype=np.int64)) * dtype.itemsize
            offset = self.data_start + info["data_offsets"][0] + t.row_start * row
            values = np.frombuffer(self.fh.read_at(t.shape[0] * row, offset), dtype=dtype)
            yield start, torch.from_numpy(values.astype(np.float32))  # a writable copy of one tensor
            start += t.numel


# ---- derivation -----------------------------------------------------------------------------------------
def _tensor_top(values: torch.Tensor, depth: int) -> torch.Tensor:
    """Positions of the `depth` largest values, ties broken by lower position, ascending."""
    if depth >= values.numel():
        return torch.arange(values.numel())
    top, pos = torch.topk(values, depth, sorted=False)
    kth = top.min()
    if int((values == kth).sum()) == int((top == kth).sum()):  # no tie cut at the boundary: topk is exact
        return torch.sort(pos).values
    above = torch.nonzero(values > kth).squeeze(1)
    ties = torch.nonzero(values == kth).squeeze(1)[: depth - above.numel()]
    return torch.sort(torch.cat([above, ties])).values


def derive_ranking(stream: ScoreStream, layout: ModelLayout, depths: torch.Tensor) -> tuple[Ranking, dict[str, Any]]:
    """The compact per-tensor ranking: each tensor's top `depths[i]` entries, ordered as the global ranking
    (score descending, ties by lower id). See the module docstring for why allocation over it is exact."""
    started = time.perf_counter()
    ids, scores, n_all = [], [], 0
    for (start, values), depth in zip(stream(), depths.tolist()):
        pos = _tensor_top(values, depth)
        ids.append(pos + start)
        scores.append(values[pos])
        n_all = start + values.numel()
    expected = sum(t.numel for t in layout.scored)
    if n_all != expected:
        raise ValueError(f"the map holds {n_all:,} scored entries, its layout {expected:,}; recompute the map")
    flat_ids, flat_scores = torch.cat(ids), torch.cat(scores)
    order = torch.sort(flat_scores, descending=True, stable=True).indices  # ids ascend: ties by lower id
    ranking = Ranking(flat_ids[order], flat_scores[order], layout, n_all,
                      {"tensor_depths": depths.tolist()}).compact()
    info = {"k": int(ranking.ids.numel()), "num_entries": n_all, "nbytes": ranking.nbytes,
            "full_map_bytes": 4 * n_all, "total_params": layout.total_params,
            "derive_s": time.perf_counter() - started}
    return ranking, info
