"""Where sensitivity lives: the share of the top-k entries per block and matrix type (SPT's Figure 3)."""

from __future__ import annotations

import torch

from .layout import ModelLayout
from .plan import block_of, matrix_kind
from .sensitivity import Ranking, SensitivityMap

MATRIX_COLUMNS = ("q", "k", "v", "proj", "fc1", "fc2", "vectors")


def sensitivity_shares(source: SensitivityMap | Ranking, k: int) -> tuple[list[str], list[str], torch.Tensor]:
    """(block names, column names, shares) with shares[b, c] = fraction of the top-k entries in block b's
    matrices of type c (or its vectors). Rows sum with everything outside blocks (final norm) to 1."""
    ranking = source.ranking(k) if isinstance(source, SensitivityMap) else source
    ids = ranking.ids[:k].to(torch.int64)
    layout: ModelLayout = ranking.layout
    scored = layout.scored
    ends = torch.cumsum(torch.tensor([t.numel for t in scored]), 0)
    counts = torch.bincount(torch.searchsorted(ends, ids, right=True), minlength=len(scored))
    blocks = sorted({block_of(t.name) for t in scored if block_of(t.name).startswith(("blocks", "layers", "stages"))},
                    key=lambda b: [int(x) if x.isdigit() else x for x in b.split(".")])
    shares = torch.zeros(len(blocks), len(MATRIX_COLUMNS))
    row = {b: i for i, b in enumerate(blocks)}
    for t, n in zip(scored, counts.tolist()):
        b = block_of(t.name)
        if b in row and n:
            column = matrix_kind(t) if t.role == "matrix" else "vectors"
            shares[row[b], MATRIX_COLUMNS.index(column) if column in MATRIX_COLUMNS else -1] += n
    return blocks, list(MATRIX_COLUMNS), shares / max(1, ids.numel())
