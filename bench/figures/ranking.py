"""Bytes of the ranking a trial pulls from the object store vs the full sensitivity map."""

from __future__ import annotations

import time
from typing import Any, Callable

from .common import SYNTHETIC_SIGMAS, ModelSpec, synthetic_sensitivity



def measure_ranking_bytes(spec: ModelSpec, *, max_budget: int | None = None, alphas=(2.0, 40.0), ranks=(8,),
                          calibrate: bool = True, log: Callable[[str], None]) -> dict[str, Any]:
    """A synthetic heavy-tailed map of the backbone; the ranking the sweep's store would put in the object
    store for a search space reaching `max_budget` (LoRA and Adapter, alpha over `alphas`, `ranks`)."""
    layout = spec.layout()
    max_budget = max_budget or (1_000_000 if not spec.tiny else 5_000)
    t0 = time.perf_counter()
    smap = synthetic_sensitivity(layout)
    gen_s = time.perf_counter() - t0
    space = {"methods": ["spt-lora", "spt-adapter"], "budget": [min(5e4, max_budget / 20), max_budget],
             "budget_unit": "params", "alpha": list(alphas), "rank": list(ranks)}
    t0 = time.perf_counter()
    from spt_ray.rankings import derive_ranking, map_stream  # no Ray needed: runs on the GPU machine too
    from spt_ray.space import RankingNeeds, SearchSpace

    needs = RankingNeeds(SearchSpace.from_dict(space))
    ranking, _ = derive_ranking(map_stream(smap), smap.layout, needs.depths(smap.layout))
    derive_s = time.perf_counter() - t0
    nbytes = ranking.compact().nbytes
    full = 4 * smap.num_entries
    calibration = _calibration(spec, ranking, space, log) if calibrate and not spec.tiny else None
    log(f"  ranking: k={ranking.ids.numel():,} -> {nbytes / 2**20:.1f} MiB of {full / 2**20:.0f} MiB = "
        f"{nbytes / full:.4f}")
    return {"fraction": nbytes / full, "ranking_bytes": nbytes, "full_map_bytes": full,
            "num_entries": smap.num_entries, "k": int(ranking.ids.numel()), "margin": needs.margin,
            "space": space, "via": "spt_ray.rankings.derive_ranking (each tensor's top entries to its deepest "
            "switch threshold)", "bytes_per_entry": nbytes / max(1, ranking.ids.numel()),
            "synthetic_map_s": gen_s, "derive_s": derive_s, "synthetic_sigmas": dict(SYNTHETIC_SIGMAS),
            "calibration": calibration}


def _calibration(spec: ModelSpec, ranking, space, log) -> dict[str, Any]:
    """Per corner, how deep the allocation reaches (entries of the kept ranking), and the synthetic map's alpha-10
    LoRA plans next to the released plans' medians (how realistic the map's concentration is)."""
    from spt_core import allocate

    out: dict[str, Any] = {"corner_k": {}}
    lo, hi = space["alpha"]
    for structured in ("lora", "adapter"):
        for alpha in (lo, (lo * hi) ** 0.5, hi):
            plan = allocate(ranking, int(space["budget"][1]), structured=structured, alpha=alpha)
            out["corner_k"][f"{structured} alpha {alpha:.3g}"] = plan.meta["num_top_entries"]
    try:
        import statistics as st

        from spt_core.released import released_allocation, released_index

        for target in (0.4, 1.0):
            plan = allocate(ranking, int(target * 1e6), structured="lora", alpha=10.0)
            rel = [released_allocation(t, m, s) for s, t, m in released_index() if s == "lora" and m == target]
            out[f"lora_alpha10_{target}M"] = {
                "synthetic": {"structured": len(plan.of_kind("lora")), "sparse": int(sum(
                    tp.indices.numel() for tp in plan.tensors.values() if tp.kind == "sparse"))},
                "released_median": {"structured": st.median(sum(map(sum, a.tuned_matrices)) for a in rel),
                                    "sparse": st.median(a.sparse_params for a in rel)}}
    except (ImportError, ValueError) as err:
        out["released"] = f"released allocations not available: {err}"
    log(f"  ranking depth per corner: {out['corner_k']}")
    return out
