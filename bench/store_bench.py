"""The sensitivity store at ViT-B/16 and ViT-L/16 scale, measured side by side in one run: writes the
`store` object of bench/results.json (merged: every other key is kept).

    python bench/store_bench.py            # ViT-B/16 (85M entries) and ViT-L/16 (303M), synthetic maps
    python bench/store_bench.py --small    # the same on tiny layouts: a plumbing check in seconds

Figures (the VTAB recipe's search space; maps are synthetic, heavy-tailed, seed 0, see figures.synthetic_sensitivity):
* ranking_bytes_fraction_vitb / _vitl: bytes of the object every trial reads / bytes of the fp32 map;
* derive_peak_extra_vs_map: peak RSS added by deriving a ViT-B ranking through the store's path (checked
  and read from storage, `rank_from_disk`, nothing cached) / the map's bytes;
* derive_speedup_vs_before: the derivation before this change (`before_truncated_ranking` below, a
  verbatim copy kept only here) / the new one, same map in memory, each in a fresh process, back to back
  (median over rounds whose order alternates: the machine is shared and its load moves);
* full_map_reads: configurations of every shipped recipe's space (corners and random points, on the
  recipe's backbone layout) whose plan the stored ranking cannot give, plus ViT-B corners planned with
  `build_trial_plan` on the derived synthetic ranking;
* zero_copy: two `ray.get` of the ranking object in one worker share one buffer (a local Ray instance).
Each derivation runs in a fresh subprocess, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)] if str(ROOT) not in sys.path else []
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from spt_core import Ranking, allocate  # noqa: E402
from spt_core.layout import ModelLayout  # noqa: E402
from spt_ray.space import STRUCTURED_OF, RankingNeeds, SearchSpace  # noqa: E402
from spt_ray.suites import RECIPES  # noqa: E402

MODELS = {"vitb": "vit_base_patch16_224", "vitl": "vit_large_patch16_224"}
SMALL = {"vitb": dict(depth=2, embed_dim=192, num_heads=3), "vitl": dict(depth=3, embed_dim=256, num_heads=4)}


def layout_of(which: str, small: bool) -> ModelLayout:
    import timm

    with torch.device("meta"):
        model = timm.create_model(MODELS[which], pretrained=False, **(SMALL[which] if small else {}))
    return ModelLayout.from_model(model)


def vtab_needs(small: bool = False) -> RankingNeeds:
    """The VTAB recipe's space; on the tiny layouts its budgets as a share of the model (0.1%..30%)."""
    space = RECIPES["vtab"]["space"]
    if small:
        space = {**space, "budget": [0.001, 0.3], "budget_unit": "fraction"}
    return RankingNeeds(SearchSpace.from_dict(space))


# ---- the derivation before this change, verbatim (spt_ray/store.py truncated_ranking), for comparison only ----
BEFORE = dict(margin=1.25, slack=256, beta=5.0, alpha_points=5, depth_factor=8)  # the old RankingNeeds defaults


def before_truncated_ranking(smap, space: SearchSpace) -> tuple[Ranking, dict[str, Any]]:
    """The "before" reference: a prefix of the global ranking sized from the space's corners."""
    start = time.perf_counter()
    flat = smap.flat_scores()
    n_all = flat.numel()
    corners = space.resolve(smap.layout.total_params).corners(BEFORE["alpha_points"])
    max_budget = max((c["budget"] for c in corners), default=0)
    n = min(n_all, max(4096, BEFORE["depth_factor"] * max_budget))
    prefix = Ranking.from_scores(flat, smap.layout, n)
    depths, deep = [], 0
    for c in corners:
        try:
            k = allocate(prefix, c["budget"], structured=c["structured"], rank=c["rank"], alpha=c["alpha"],
                         beta=BEFORE["beta"]).meta["num_top_entries"]
        except ValueError:
            if not prefix.truncated:
                raise
            k = n
        if k >= n and prefix.truncated:
            deep += 1
        else:
            depths.append(k)
    deepest = max(depths, default=0)
    k = min(n_all, math.ceil(deepest * BEFORE["margin"]) + BEFORE["slack"])
    ranking = Ranking(prefix.ids[:k], prefix.scores[:k], smap.layout, n_all).compact() if k <= n else \
        Ranking.from_scores(flat, smap.layout, k).compact()
    info = {"k": k, "deepest_corner_k": deepest, "deep_corners": deep, "corners": len(corners),
            "num_entries": n_all, "derive_s": time.perf_counter() - start, "nbytes": ranking.nbytes,
            "full_map_bytes": n_all * 4}
    return ranking, info


# ---- workers: one derivation per fresh process -----------------------------------------------------------
def _vm(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def worker(args: dict[str, Any]) -> dict[str, Any]:
    """`store`: the store's path from storage (rank_from_disk, nothing cached); `new` / `before`: the new
    and the old derivation of a map already in memory (its bytes not counted as extra)."""
    from spt_core.sensitivity import SensitivityMap
    from spt_ray.ranking_cache import rank_from_disk
    from spt_ray.rankings import derive_ranking, map_stream
    from spt_ray.storage import Storage

    torch.set_num_threads(int(args["threads"]))
    needs = vtab_needs(args["small"])
    smap = None
    if args["kind"] != "store":  # in memory, every page touched (load_file may map the file lazily)
        loaded = SensitivityMap.load(args["map"])
        smap = SensitivityMap({p: loaded[p].clone() for p in loaded}, loaded.layout, loaded.meta)
        del loaded
    base = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak mark (VmHWM) to now
    t0 = time.perf_counter()
    if args["kind"] == "store":
        status, ranking, info = rank_from_disk(Storage.of(args["storage"]), args["key_fields"], needs)
        assert status == "ok" and "cached" not in info, (status, ranking, info)
    elif args["kind"] == "new":
        ranking, info = derive_ranking(map_stream(smap), smap.layout, needs.depths(smap.layout))
    else:
        ranking, info = before_truncated_ranking(smap, needs.space)
    seconds = time.perf_counter() - t0
    out = {"kind": args["kind"], "seconds": seconds, "peak_extra_bytes": _vm("VmHWM") - base,
           "base_rss_bytes": base, "peak_rss_bytes": _vm("VmHWM"),  # the whole process, imports included
           **{k: info[k] for k in ("k", "nbytes", "full_map_bytes", "deep_corners") if k in info}}
    if args.get("save"):
        torch.save({"ids": ranking.ids, "scores": ranking.scores.view(torch.int16), "meta": ranking.meta},
                   args["save"])
    return out


def run_worker(args: dict[str, Any], log) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args['kind']} failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"  {args['kind']:>6}: {out['seconds']:8.1f} s, peak extra {out['peak_extra_bytes'] / 2**20:8.0f} MiB, "
        f"k={out['k']:,} ({out['nbytes'] / 2**20:.1f} MiB)")
    return out


# ---- the figures ---------------------------------------------------------------------------------------
def persisted_map(which: str, small: bool, tmp: Path, log) -> tuple[dict[str, Any], int]:
    """A synthetic map of the model's layout, persisted as the store does (files + manifest)."""
    from figures import synthetic_sensitivity
    from spt_ray.storage import Storage
    from spt_ray.store import persist_map

    layout = layout_of(which, small)
    t0 = time.perf_counter()
    smap = synthetic_sensitivity(layout, seed=0)
    key_fields = {"key": f"synthetic-{which}", "backbone": MODELS[which], "seed": 0}
    persist_map(Storage.of(tmp), key_fields, smap)
    n = smap.num_entries
    log(f"{MODELS[which]}: {n:,} entries ({4 * n / 2**20:.0f} MiB fp32), synthetic map written in "
        f"{time.perf_counter() - t0:.0f} s")
    return key_fields, n


def uncovered_configs(samples: int = 400) -> dict[str, int]:
    """Per shipped recipe: sampled configurations (all corners + random points) its ranking cannot serve."""
    from spt_ray.rankings import covers

    out = {}
    for name, spec in RECIPES.items():
        if spec["backbone"]["name"] == "spt-mini-vit":
            from spt_core.embedded import build_embedded_vit

            with torch.device("meta"):
                layout = ModelLayout.from_model(build_embedded_vit(10))
        else:
            layout = layout_of("vitb", small=False)
        space = SearchSpace.from_dict(spec["space"])
        n = sum(t.numel for t in layout.scored)
        ranking = Ranking(torch.zeros(0, dtype=torch.int32), torch.zeros(0), layout, n,
                          {"tensor_depths": RankingNeeds(space).depths(layout).tolist()})
        rng = random.Random(0)
        points = [(m, r, a) for m in space.methods for r in space.rank for a in (space.alpha.low, space.alpha.high)]
        points += [(rng.choice(space.methods), rng.choice(space.rank),
                    rng.uniform(space.alpha.low, space.alpha.high)) for _ in range(samples)]
        out[name] = sum(not covers(ranking, STRUCTURED_OF[m], r, a) for m, r, a in points)
    return out


class _FullMapRead(Exception):
    pass


def _read_full():
    raise _FullMapRead


def corner_plans(saved: str, layout: ModelLayout, n: int, small: bool) -> dict[str, Any]:
    """ViT-B corners of the VTAB space (max budget, ranks 4 and 16, both alpha ends; rank 4 at 1M is beyond
    what rank-4 tensors absorb, the old "deep" corners) planned by a trial from the derived ranking."""
    from spt_ray.trainable import build_trial_plan

    blob = torch.load(saved, weights_only=True)
    ranking = Ranking(blob["ids"], blob["scores"].view(torch.bfloat16), layout, n, blob["meta"])
    space = vtab_needs(small).space
    budget = space.resolve(layout.total_params).budget_high
    reads, configs = 0, 0
    for method in space.methods:
        for rank in (min(space.rank), max(space.rank)):
            for alpha in (space.alpha.low, space.alpha.high):
                config = {"method": method, "budget": budget, "alpha": alpha, "rank": rank, "bits": None}
                configs += 1
                try:
                    build_trial_plan(config, ranking, _read_full)
                except _FullMapRead:
                    reads += 1
    return {"configs": configs, "budget": budget, "full_map_reads": reads}


def zero_copy(saved: str, layout: ModelLayout, n: int) -> dict[str, Any]:
    import ray

    blob = torch.load(saved, weights_only=True)
    packed = Ranking(blob["ids"], blob["scores"].view(torch.bfloat16), layout, n, blob["meta"]).pack()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,  # never another's cluster
             object_store_memory=2 * packed.nbytes + 2**27)
    try:
        @ray.remote
        def two_reads(box):
            a, b = (ray.get(box[0]).unpack() for _ in range(2))
            return a.ids.data_ptr() == b.ids.data_ptr() and a.scores.data_ptr() == b.scores.data_ptr()

        same = ray.get(two_reads.remote([ray.put(packed)]))
    finally:
        ray.shutdown()
    return {"same_buffer": bool(same), "object_bytes": packed.nbytes}


def run(args: argparse.Namespace) -> dict[str, Any]:
    log = (lambda *a: None) if args.silent else (lambda msg: print(msg, flush=True))
    started = time.perf_counter()
    threads = args.threads or torch.get_num_threads()
    out: dict[str, Any] = {}
    details: dict[str, Any] = {"synthetic": True, "space": RECIPES["vtab"]["space"], "threads": threads,
                               "small": args.small}
    with tempfile.TemporaryDirectory(prefix="spt-store-bench-") as tmp:
        tmp_path = Path(tmp)
        for which in args.models:
            key_fields, n = persisted_map(which, args.small, tmp_path / which, log)
            common = {"threads": threads, "small": args.small, "storage": str(tmp_path / which),
                      "key_fields": key_fields,
                      "map": str(tmp_path / which / "sensitivity" / key_fields["key"] / "map.safetensors")}
            runs = {"store": run_worker({**common, "kind": "store", "save": str(tmp_path / f"{which}.pt")}, log)}
            if which == "vitb":
                layout = layout_of(which, args.small)
                details["vitb_corner_plans"] = corner_plans(str(tmp_path / f"{which}.pt"), layout, n, args.small)
                details["zero_copy"] = zero_copy(str(tmp_path / f"{which}.pt"), layout, n)
                log(f"  corner plans {details['vitb_corner_plans']}, zero copy {details['zero_copy']}")
                kinds = ("new",) if args.skip_before else ("new", "before")  # back to back, order alternating
                runs["rounds"] = [{kind: run_worker({**common, "kind": kind}, log)
                                   for kind in (kinds if r % 2 == 0 else kinds[::-1])} for r in range(args.rounds)]
            store = runs["store"]
            out[f"ranking_bytes_fraction_{which}"] = store["nbytes"] / store["full_map_bytes"]
            details[which] = {"model": MODELS[which], "entries": n, "map_bytes": 4 * n, "runs": runs,
                              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "vitb" in details:
        vitb = details["vitb"]["runs"]
        out["derive_peak_extra_vs_map"] = vitb["store"]["peak_extra_bytes"] / details["vitb"]["map_bytes"]
        ratios = [r["before"]["seconds"] / r["new"]["seconds"] for r in vitb["rounds"] if "before" in r]
        out["derive_speedup_vs_before"] = statistics.median(ratios) if ratios else None
        details["speedup_per_round"] = ratios
        details["uncovered_configs"] = uncovered_configs()
        out["full_map_reads"] = sum(details["uncovered_configs"].values()) + \
            details["vitb_corner_plans"]["full_map_reads"]
        out["zero_copy"] = details["zero_copy"]["same_buffer"]
    if "vitl" in details:
        out["vitl_derive_peak_extra_bytes"] = details["vitl"]["runs"]["store"]["peak_extra_bytes"]
        out["vitl_derive_peak_rss_bytes"] = details["vitl"]["runs"]["store"]["peak_rss_bytes"]
    out["details"] = {**details, f"total_s_{'_'.join(args.models)}": time.perf_counter() - started,
                      "command": "python bench/store_bench.py" + (" --small" if args.small else "")}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="the sensitivity store at ViT-B/16 and ViT-L/16 scale")
    ap.add_argument("--small", action="store_true", help="tiny layouts: a plumbing check in seconds")
    ap.add_argument("--skip-before", action="store_true", help="skip the (slow) old derivation")
    ap.add_argument("--rounds", type=int, default=3, help="back-to-back new/before pairs (median ratio)")
    ap.add_argument("--threads", type=int, help="torch threads per derivation (default: torch's)")
    ap.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS),
                    help="which backbones (a later run of one merges into the store object)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    ap.add_argument("--silent", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    store = run(args)
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    old = results.get("store", {})  # every other key stays as it was; a run of one model updates its figures
    results["store"] = {**old, **store, "details": {**old.get("details", {}), **store["details"]}}
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    if not args.silent:
        print(json.dumps({k: v for k, v in store.items() if k != "details"}, indent=1))
    return store


if __name__ == "__main__":
    main()
