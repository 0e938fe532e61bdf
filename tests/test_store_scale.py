"""The ranking the sensitivity store derives and keeps, without Ray: exact against brute force, exact for
allocation at every budget of a space (so no trial of the space reads the full map), sized for every
shipped recipe at ViT-B/16 scale, read from storage tensor by tensor, and cached with its own checksum;
and the lock file that lets one of several drivers sharing a storage compute a map."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time

import pytest
import timm
import torch

from bench.figures import synthetic_sensitivity
from spt_core.allocate import allocate
from spt_core.embedded import build_embedded_vit
from spt_core.experiment import TaskRef, compute_task_sensitivity
from spt_core.layout import ModelLayout
from spt_core.sensitivity import Ranking, SensitivityMap
from spt_ray.maplock import LOCK_FILE, MapLock, once_across_drivers
from spt_ray.ranking_cache import rank_from_disk
from spt_ray.rankings import covers, derive_ranking, map_stream
from spt_ray.space import STRUCTURED_OF, RankingNeeds, SearchSpace
from spt_ray.storage import Storage
from spt_ray.store import MAP_FILE, MapUnavailable, SensitivityRequest, load_map, persist_map
from spt_ray.suites import RECIPES
from spt_ray.trainable import build_trial_plan
from tests.conftest import tiny_vit

NEEDS = RankingNeeds(SearchSpace())


def _layout(name: str) -> ModelLayout:
    with torch.device("meta"):
        model = build_embedded_vit(10) if name == "spt-mini-vit" else timm.create_model(name, pretrained=False)
    return ModelLayout.from_model(model)


@pytest.fixture(scope="module")
def shapes_map(ray_mini_root, ray_backbone):
    request = SensitivityRequest(TaskRef("mini", "shapes", ray_mini_root), ray_backbone, num_batches=2, batch_size=32)
    smap = compute_task_sensitivity(request.task, request.backbone, num_batches=2, batch_size=32, progress=False)
    return request, smap


def test_derivation_matches_a_brute_force_global_sort_with_ties():
    """Each tensor's top `depth` entries in global order (score descending, lower id first on ties), checked
    against a full stable sort of the flat map filtered tensor by tensor."""
    layout = ModelLayout.from_model(tiny_vit())
    smap = synthetic_sensitivity(layout, seed=3)
    for name in list(smap)[:4]:  # ties inside tensors and across them
        smap[name].view(-1)[::7] = 0.5
    for name in list(smap)[4:8]:  # ties cut by a tensor's depth: the lower ids are kept
        smap[name].view(-1)[: smap[name].numel() // 2] = 2.0
    depths = torch.tensor([max(1, t.numel // d) for t, d in zip(layout.scored, [3, 50, 1, 7] * 999)])
    ranking, info = derive_ranking(map_stream(smap), layout, depths)

    flat = smap.flat_scores()
    order = torch.sort(flat, descending=True, stable=True).indices
    ends = torch.cumsum(torch.tensor([t.numel for t in layout.scored]), 0)
    owner = torch.searchsorted(ends, order, right=True)
    seen = torch.zeros(len(layout.scored), dtype=torch.int64)
    keep = []
    for pos, o in zip(order.tolist(), owner.tolist()):
        if seen[o] < depths[o]:
            keep.append(pos)
            seen[o] += 1
    assert ranking.ids.dtype == torch.int32 and ranking.ids.tolist() == keep
    assert torch.equal(ranking.scores, flat[keep].to(torch.bfloat16))
    assert info["k"] == len(keep) and info["num_entries"] == flat.numel() and ranking.meta["tensor_depths"] == \
        depths.tolist()


@pytest.mark.slow
def test_allocation_over_the_ranking_equals_the_full_map_at_every_budget(shapes_map):
    """The old prefix ranking sent budgets near or above what a rank can absorb ("deep corners") to the full
    map; the per-tensor ranking gives the full map's plan for every point of the space, deep ones included."""
    _, smap = shapes_map
    space = SearchSpace.from_dict({"budget": [0.001, 0.6], "rank": [1, 4, 8], "alpha": [2.0, 40.0]})
    ranking, info = derive_ranking(map_stream(smap), smap.layout, RankingNeeds(space).depths(smap.layout))
    assert info["nbytes"] == ranking.nbytes < info["full_map_bytes"] / 4
    resolved = space.resolve(smap.layout.total_params)
    rng = random.Random(0)
    configs = [(s, r, a, resolved.budget_high) for s in ("lora", "adapter") for r in space.rank for a in (2.0, 40.0)]
    configs += [(rng.choice(["lora", "adapter"]), rng.choice(space.rank), rng.uniform(2.0, 40.0),
                 round(resolved.budget_low * (resolved.budget_high / resolved.budget_low) ** rng.random()))
                for _ in range(8)]
    deep = 0
    for structured, rank, alpha, budget in configs:
        full = allocate(smap, budget, structured=structured, rank=rank, alpha=alpha)
        plan, source = build_trial_plan({"method": f"spt-{structured}", "budget": budget, "alpha": alpha,
                                         "rank": rank, "bits": None}, ranking, lambda: pytest.fail("full map read"))
        assert source == "ranking" and plan.trainable_params == full.trainable_params
        assert plan.to_dict()["tensors"] == full.to_dict()["tensors"]
        deep += full.meta["num_top_entries"] > ranking.ids.numel()  # deeper than the whole stored ranking
    assert deep >= 4


def test_configs_outside_the_space_read_the_full_map(shapes_map):
    _, smap = shapes_map
    space = SearchSpace.from_dict({"rank": [4], "alpha": [8.0, 40.0]})
    ranking, _ = derive_ranking(map_stream(smap), smap.layout, RankingNeeds(space, margin=1.0).depths(smap.layout))
    loads = []

    def load_full():
        loads.append(1)
        return smap

    budget = space.resolve(smap.layout.total_params).budget_high
    inside = {"method": "spt-adapter", "budget": budget, "alpha": 8.0, "rank": 4, "bits": None}
    assert build_trial_plan(inside, ranking, load_full)[1] == "ranking" and not loads
    for outside in ({**inside, "rank": 8}, {**inside, "alpha": 7.0}):
        plan, source = build_trial_plan(outside, ranking, load_full)
        assert source == "full-map" and plan.to_dict()["tensors"] == allocate(
            smap, budget, structured="adapter", rank=outside["rank"], alpha=outside["alpha"]).to_dict()["tensors"]
    assert loads == [1, 1]
    assert build_trial_plan({"method": "linear", "lr": 1e-3}, ranking, load_full)[1] == "layout"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_shipped_recipe_space_is_covered_by_its_ranking(recipe):
    """Every corner and interior point of a shipped recipe's space allocates from the stored ranking (zero
    full-map reads), checked on the recipe's real backbone layout (ViT-B/16 for VTAB and FGVC); and the
    ranking stays under 5% of the fp32 map's bytes at ViT-B/16 size."""
    spec = RECIPES[recipe]
    layout = _layout(spec["backbone"]["name"])
    space = SearchSpace.from_dict(spec["space"])
    depths = RankingNeeds(space).depths(layout)
    n = sum(t.numel for t in layout.scored)
    ranking = Ranking(torch.zeros(0, dtype=torch.int32), torch.zeros(0), layout, n, {"tensor_depths": depths.tolist()})
    rng = random.Random(1)
    points = [(m, r, a) for m in space.methods for r in space.rank for a in (space.alpha.low, space.alpha.high)]
    points += [(rng.choice(space.methods), rng.choice(space.rank), rng.uniform(space.alpha.low, space.alpha.high))
               for _ in range(50)]
    assert all(covers(ranking, STRUCTURED_OF[m], r, a) for m, r, a in points)
    assert not covers(ranking, "lora", 2 * max(space.rank), space.alpha.low)
    assert 6 * int(depths.sum()) / (4 * n) <= (0.05 if n > 50_000_000 else 0.2)  # ViT-B/16: 85M entries


def test_maps_persist_verify_and_reload(shapes_map, tmp_path):
    """A reload reads the cached ranking (checked by its own sha256; the map is not read), a broken cached
    ranking is derived again from the map, read tensor by tensor and checked against its manifest."""
    request, smap = shapes_map
    storage = Storage.of(f"file://{tmp_path}")  # through pyarrow, as a bucket would be
    key_fields = request.key_fields()
    assert rank_from_disk(storage, key_fields, NEEDS)[:2] == ("unavailable", "missing")
    persist_map(storage, key_fields, smap)
    status, ranking, info = rank_from_disk(storage, key_fields, NEEDS)
    expected, _ = derive_ranking(map_stream(smap), smap.layout, NEEDS.depths(smap.layout))
    assert status == "ok" and "cached" not in info
    assert torch.equal(ranking.ids, expected.ids) and torch.equal(ranking.scores, expected.scores)
    entry = tmp_path / "sensitivity" / key_fields["key"]
    blob = entry / MAP_FILE
    blob.write_bytes(blob.read_bytes()[:-8] + b"corrupt!")
    status, cached, info = rank_from_disk(storage, key_fields, NEEDS)
    assert status == "ok" and info["cached"] and torch.equal(cached.ids, ranking.ids)
    with pytest.raises(MapUnavailable, match="sha256"):
        load_map(storage, key_fields)  # what a trial outside the space would read is still checked
    (cache,) = entry.glob("ranking-*.safetensors")
    cache.write_bytes(cache.read_bytes()[:-4] + b"bad!")
    assert rank_from_disk(storage, key_fields, NEEDS)[:2] == ("unavailable", "corrupt")


_PEAK = """
import json, resource, sys
from spt_core.layout import ModelLayout
from spt_ray.rankings import MapFile, derive_ranking
from spt_ray.space import RankingNeeds, SearchSpace
from spt_ray.storage import Storage
path, layout_path = sys.argv[1:]
layout = ModelLayout.from_dict(json.load(open(layout_path))["layout"])
needs = RankingNeeds(SearchSpace.from_dict({"rank": [4, 8, 16]}))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with MapFile(Storage.of("/"), path, layout) as f:
    f.sha256()
    ranking, info = derive_ranking(f.stream, layout, needs.depths(layout))
print(json.dumps({"extra": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, **info}))
"""


@pytest.mark.slow
def test_derivation_from_storage_never_holds_the_map(tmp_path):
    """Peak memory of checking and deriving from a 22M-entry (88 MB) map file: a fraction of the map."""
    layout = _layout("vit_small_patch16_224")
    smap = synthetic_sensitivity(layout, seed=0)
    smap.save(tmp_path / MAP_FILE)
    del smap
    out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / MAP_FILE), f"{tmp_path / MAP_FILE}.json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["extra"] < 0.5 * result["full_map_bytes"], result


# ---- one computation per map across drivers sharing a storage ---------------------------------------------
@pytest.mark.parametrize("uri", [False, True])
def test_the_lock_file_admits_one_holder_and_is_taken_over_when_stale(tmp_path, uri):
    storage = Storage.of(f"file://{tmp_path}" if uri else tmp_path)
    first, second = (MapLock(storage, storage.path("sensitivity", "k"), stale_s=30) for _ in range(2))
    assert first.acquire() and not second.acquire() and second.held_by_other()
    first.refresh()
    assert not second.acquire()
    second.release()  # not its lock: nothing happens
    assert not second.acquire()
    first.release()
    assert second.acquire()  # released: the next one takes it
    lock = tmp_path / "sensitivity" / "k" / LOCK_FILE
    os.utime(lock, (time.time() - 60, time.time() - 60))  # its holder died a minute ago
    assert not second.held_by_other() and first.acquire() and not second.acquire()


def test_two_drivers_computing_one_map_compute_it_once(tmp_path):
    """Two stores (two drivers) start on one missing map at the same moment: one computes, the other waits
    for it and loads it; a lock whose holder died is taken over."""
    storage = Storage.of(tmp_path)
    directory = storage.path("sensitivity", "k")
    done = tmp_path / "map-written"
    computed = []

    async def compute():
        computed.append(1)
        await asyncio.sleep(0.5)
        done.write_text("map")
        return "map"

    async def reload():
        return done.read_text() if done.exists() else None

    async def two_drivers():
        locks = [MapLock(storage, directory, stale_s=5) for _ in range(2)]
        return await asyncio.gather(*(once_across_drivers(lock, compute, reload, poll_s=0.05) for lock in locks))

    assert sorted(asyncio.run(two_drivers())) == [("computed", "map"), ("waited", "map")] and computed == [1]
    assert not (tmp_path / "sensitivity" / "k" / LOCK_FILE).exists()  # released
    done.unlink()
    dead = MapLock(storage, directory, stale_s=0.3)
    assert dead.acquire()  # a driver that took the lock and was killed: never refreshed, never released
    started = time.perf_counter()
    assert asyncio.run(once_across_drivers(MapLock(storage, directory, stale_s=0.3), compute, reload,
                                           poll_s=0.05)) == ("computed", "map")
    assert computed == [1, 1] and time.perf_counter() - started >= 0.25
