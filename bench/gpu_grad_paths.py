"""The sparse delta's gradient on a GPU: which way of computing it is fastest (needs CUDA, no Ray).

For each ViT-B/16 weight shape and density, the K entries grad[r, c] = sum_n g[n, r] x[n, c] over the
N = 64 x 197 tokens of a batch, in bf16 as a step under autocast produces them:
  dense_gather   the dense product g^T x (cuBLAS, fp32 accumulation), then the K entries gathered
  dense_fp32out  the same with an fp32 output (torch.mm out_dtype; torch >= 2.9)
  rows_gather    the product restricted to the rows holding entries, then gathered
  elementwise    the K dot products as gathered columns (K < 3000 only; its memory grows as N x K)
The step itself used cuSPARSE's sampled matmul (sparse_sampled_addmm), about 275 us a layer in
bench/gpu/profile_spt_step.txt. Output of one run: bench/gpu/grad_paths.txt.

    python bench/gpu_grad_paths.py
"""
from __future__ import annotations

import torch
from torch.utils.benchmark import Timer

SHAPES = ((768, 768), (2304, 768), (3072, 768), (768, 3072))  # (out, in): proj / qkv / fc1 / fc2
TOKENS = 64 * 197


def main() -> None:
    d, n = "cuda", TOKENS
    for o, i in SHAPES:
        for p in (0.001, 0.01):
            k = int(o * i * p)
            idx = torch.randperm(o * i, device=d)[:k].sort().values
            r, c = idx // i, idx % i
            g = torch.randn(n, o, device=d, dtype=torch.bfloat16)
            x = torch.randn(n, i, device=d, dtype=torch.bfloat16)
            ur = torch.unique(r)
            paths = {
                "dense_gather": lambda: (g.t() @ x).view(-1)[idx],
                "dense_fp32out": lambda: torch.mm(g.t(), x, out_dtype=torch.float32).view(-1)[idx],
                "rows_gather": lambda: (g[:, ur].t() @ x)[torch.searchsorted(ur, r), c],
                "elementwise": (lambda: (g[:, r].float() * x[:, c].float()).sum(0)) if k < 3000 else None,
            }
            us = {}
            for name, fn in paths.items():
                if fn is None:
                    continue
                try:
                    us[name] = round(Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median
                                     * 1e6, 1)
                except Exception as err:  # noqa: BLE001 - an older torch lacks out_dtype
                    us[name] = type(err).__name__
            print(o, i, p, "K", k, "rows", len(ur), us, flush=True)


if __name__ == "__main__":
    main()
