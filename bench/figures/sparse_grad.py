"""The sparse delta's gradient against a dense trainable weight's."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from torch.nn import functional as F

from .common import median, sync


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, device,
                cpu: dict[str, list[float]] | None = None, budget_s: float | None = None,
                min_rounds: int = 5) -> dict[str, list[float]]:
    """Seconds per call of each function, `rounds` times in an order that rotates every round; each sample
    repeats its function enough times to last ~20 ms (timer resolution, short kernels). `cpu`, if given,
    receives this process's CPU seconds per call too (less sensitive to other processes on a shared CPU).
    `budget_s`, if given, ends the rounds once that many seconds have passed, after `min_rounds` at least."""

    def timeit(fn, reps: int, name: str | None = None) -> float:
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            fn()
        sync(device)
        if cpu is not None and name is not None:
            cpu.setdefault(name, []).append((time.process_time() - c0) / reps)
        return (time.perf_counter() - t0) / reps

    reps = {n: max(1, min(50, math.ceil(0.02 / max(1e-6, timeit(f, 1))))) for n, f in fns.items()}
    samples: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    start = time.perf_counter()
    for r in range(rounds):
        if budget_s is not None and r >= min_rounds and time.perf_counter() - start > budget_s:
            break
        for n in names[r % len(names):] + names[:r % len(names)]:
            samples[n].append(timeit(fns[n], reps[n], n))
    return samples


def random_positions(size: int, k: int, g: torch.Generator) -> torch.Tensor:
    """k distinct flat positions out of `size`, uniformly at random, sorted (row-major, as the CSR pattern needs)."""
    return torch.sort(torch.randperm(size, generator=g)[:k]).values


def random_entries(d: int, density: float, g: torch.Generator, device, col_fraction: float | None = None):
    """K = density x d^2 distinct positions of a d x d matrix, uniformly at random (no row or column
    concentration: the worst case for the entry gradients' operands), or, with `col_fraction`, uniformly within
    that share of the input columns (as in SPT's released allocations, whose entries fall in 0.1-10% of a
    matrix's input columns). Returns K, rows, cols, a zero delta and the layer's keyword arguments: the CSR
    pattern, and for concentrated entries the used columns as TunedLinear passes them."""
    from spt_core.modules.sparse import csr_pattern

    k = max(1, round(density * d * d))
    if col_fraction is None:
        flat = random_positions(d * d, k, g)
    else:
        used = torch.sort(torch.randperm(d, generator=g)[:max(1, round(col_fraction * d))]).values
        picks = torch.randperm(d * used.numel(), generator=g)[:k]
        flat = torch.sort(picks // used.numel() * d + used[picks % used.numel()]).values
    rows, cols = (flat // d).to(device), (flat % d).to(device)
    delta = torch.zeros(k, device=device, requires_grad=True)
    if col_fraction is None:
        return k, rows, cols, delta, {"pattern": csr_pattern(rows, cols, (d, d))}
    used_cols, local_cols = torch.unique(cols, return_inverse=True)
    return k, rows, cols, delta, {"pattern": csr_pattern(rows, local_cols, (d, used_cols.numel())),
                                  "used_cols": used_cols, "local_cols": local_cols}


def measure_sparse_grad(*, d: int = 768, tokens: int = 1576, densities=(0.001, 0.01), rounds: int = 7,
                        device="cpu", log: Callable[[str], None]) -> dict[str, Any]:
    """One d x d matrix, `tokens` tokens. Gradient of the K selected entries: our SDDMM path (sampled_grad on
    the CSR pattern with the device's fast kernel, what SparseDeltaLinear's backward runs) vs the naive path
    (dense G^T X, then gather the K entries); torch's own SDDMM too where the fast kernel is another. Also the
    whole layer backward (grad_x + entry gradients) vs a dense trainable weight."""
    from spt_core.modules.sparse import PATH_COUNTS, sampled_grad, sparse_delta_linear

    g = torch.Generator().manual_seed(0)
    G = torch.randn(tokens, d, generator=g).to(device)
    X = torch.randn(tokens, d, generator=g).to(device)
    W = torch.randn(d, d, generator=g).to(device) * 0.02
    out: dict[str, Any] = {"d": d, "tokens": tokens, "rounds": rounds}

    for density in densities:
        k, rows, cols, delta, layer_kw = random_entries(d, density, g, device)
        pattern = layer_kw["pattern"]
        xg = X.clone().requires_grad_()
        w_dense = W.clone().requires_grad_()
        mask = torch.zeros(d, d, device=device)
        mask[rows, cols] = 1

        before = dict(PATH_COUNTS)
        sampled_grad(G, X, rows, cols, pattern)
        kernel = next((n for n in PATH_COUNTS if PATH_COUNTS[n] > before[n]), "none")
        fns = {
            "sddmm": lambda: sampled_grad(G, X, rows, cols, pattern),  # the device's fast kernel
            "dense_masked": lambda: (G.t() @ X)[rows, cols],
            "sparse_layer_backward": lambda: torch.autograd.grad(
                sparse_delta_linear(xg, W, None, delta, rows, cols, pattern), (xg, delta), G),
            "dense_layer_backward": lambda: [gr if i == 0 else gr * mask for i, gr in enumerate(torch.autograd.grad(
                F.linear(xg, w_dense), (xg, w_dense), G))],
        }
        if kernel != "sddmm":
            fns["torch_sddmm"] = lambda: sampled_grad(G, X, rows, cols, pattern, path="sddmm")
        torch.testing.assert_close(fns["sddmm"](), fns["dense_masked"](), rtol=1e-3, atol=1e-2)
        samples = interleaved(fns, rounds, device)
        ratios = [a / b for a, b in zip(samples["sddmm"], samples["dense_masked"])]
        layer = [a / b for a, b in zip(samples["sparse_layer_backward"], samples["dense_layer_backward"])]
        key = f"{density * 100:g}%"
        out[key] = {"k": k, "kernel": kernel, "s_median": {n: median(v) for n, v in samples.items()},
                    "ratio": median(ratios), "ratio_per_round": ratios, "layer_backward_ratio": median(layer)}
        log(f"  sparse grad at {key} (K={k}): SDDMM ({kernel}) {median(samples['sddmm']) * 1e3:.2f} ms vs dense masked "
            f"{median(samples['dense_masked']) * 1e3:.2f} ms -> {median(ratios):.3f}")
    return out


# Layer shapes on which the two entry-gradient kernels are compared: (d_out, kept input columns, fill).
PATH_SHAPES = tuple((d_out, n, fill) for d_out in (768, 3072) for n in (8, 48, 192, 768)
                    for fill in (0.002, 0.02, 0.2))


def measure_path_costs(*, tokens: int = 1576, shapes=PATH_SHAPES, rounds: int = 3, dtype=torch.bfloat16,
                       log: Callable[[str], None]) -> dict[str, Any]:
    """The kernels for the K entry gradients (sampled_grad's "sddmm" and "gemm", and "native" where this CPU
    has the compiled one, forced) on a grid of layer shapes: d_out x n_in products (n_in the input columns a
    layer keeps) with K = fill x d_out x n_in entries. `gemm_over_sddmm` (and `native_over_sddmm`) is each
    shape's time ratio; FAST_PATH says which kernel a device takes."""
    from spt_core.modules import native
    from spt_core.modules.sparse import csr_pattern, sampled_grad

    paths = ("sddmm", "gemm") + (("native",) if native.kernel() is not None else ())

    g = torch.Generator().manual_seed(0)
    rows_out = []
    for d_out, n, fill in shapes:
        k = max(1, round(fill * d_out * n))
        flat = random_positions(d_out * n, k, g)
        r, c = flat // n, flat % n
        pattern = csr_pattern(r, c, (d_out, n))
        G = torch.randn(tokens, d_out, generator=g).to(dtype)
        X = torch.randn(tokens, n, generator=g).to(dtype)
        fns = {p: (lambda p=p: sampled_grad(G, X, r, c, pattern, path=p)) for p in paths}
        t = {p: median(v) for p, v in interleaved(fns, rounds, "cpu").items()}
        rows_out.append({"d_out": d_out, "n_in": n, "k": k, "s": t,
                         **{f"{p}_over_sddmm": t[p] / t["sddmm"] for p in paths if p != "sddmm"}})
    for p in paths[1:]:
        log(f"  {p} / sddmm entry-gradient time by shape: " + ", ".join(
            f"{x['d_out']}x{x['n_in']} K={x['k']} {x[f'{p}_over_sddmm']:.2f}" for x in rows_out))
    return {"tokens": tokens, "dtype": str(dtype).replace("torch.", ""), "shapes": rows_out}


# The sparse layer's cases: (key, density, share of input columns holding the entries; None: anywhere).
LAYER_CASES = (("0.1%", 0.001, None), ("1%", 0.01, None), ("1%_concentrated", 0.01, 0.05))


def measure_sparse_layer(*, d: int = 768, tokens: int = 1576, cases=LAYER_CASES, rounds: int = 7, device="cpu",
                         dtype: torch.dtype = torch.bfloat16, budget_s: float | None = None,
                         log: Callable[[str], None]) -> dict[str, Any]:
    """A d x d layer under `dtype` autocast, forward + backward (input gradient included, as inside a
    network): the sparse delta (SparseDeltaLinear on a frozen weight, bias) against a plain trainable
    nn.Linear, `rounds` rounds or `budget_s` seconds a case (a CPU without native bf16 took 2 s a call).
    Records which kernel produced the entry gradients (spt_core.modules.sparse.PATH_COUNTS)."""
    from spt_core.modules.sparse import PATH_COUNTS, sparse_delta_linear

    g = torch.Generator().manual_seed(0)
    X = torch.randn(tokens, d, generator=g).to(device).requires_grad_()
    G = torch.randn(tokens, d, generator=g).to(device, dtype)
    dense = torch.nn.Linear(d, d).to(device)
    W, b = dense.weight.detach(), dense.bias.detach()
    kind = torch.device(device).type
    out: dict[str, Any] = {"d": d, "tokens": tokens, "rounds": rounds, "dtype": str(dtype).replace("torch.", "")}

    def dense_step():
        with torch.autocast(kind, dtype=dtype):
            y = dense(X)
        return torch.autograd.grad(y, (X, dense.weight, dense.bias), G)

    for key, density, col_fraction in cases:
        k, rows, cols, delta, layer_kw = random_entries(d, density, g, device, col_fraction)

        def sparse_step():
            with torch.autocast(kind, dtype=dtype):
                y = sparse_delta_linear(X, W, b, delta, rows, cols, **layer_kw)
            return torch.autograd.grad(y, (X, delta), G)

        before = dict(PATH_COUNTS)
        sparse_step()
        path = next((n for n in PATH_COUNTS if PATH_COUNTS[n] > before[n]), "none")
        cpu: dict[str, list[float]] = {}
        samples = interleaved({"sparse": sparse_step, "dense": dense_step}, rounds, device, cpu, budget_s)
        ratios = [a / b for a, b in zip(samples["sparse"], samples["dense"])]
        out[key] = {"k": k, "density": density, "col_fraction": col_fraction, "kernel": path,
                    "s_median": {n: median(v) for n, v in samples.items()},
                    "ratio": median(ratios), "ratio_per_round": ratios,
                    "cpu_time_ratio": median([a / b for a, b in zip(cpu["sparse"], cpu["dense"])])}
        log(f"  sparse layer fwd+bwd under {out['dtype']} at {key} (K={k}, {path}): "
            f"{median(samples['sparse']) * 1e3:.2f} ms vs trainable Linear "
            f"{median(samples['dense']) * 1e3:.2f} ms -> {median(ratios):.3f}")
    return out
