"""The sensitivity store on a real 3-node Ray cluster: one computation per key under concurrent requests,
reload from disk after an actor restart, detection of corrupt or mismatched files, refs readable
from every node."""

from __future__ import annotations

import json
import time

import pytest
import ray

from spt_core.experiment import TaskRef
from spt_ray.space import RankingNeeds, SearchSpace
from spt_ray.store import MANIFEST_FILE, MAP_FILE, SensitivityRequest, fetch_rankings, get_store
from spt_ray.trainable import TrialContext, fetch_ranking

pytestmark = pytest.mark.slow
NEEDS = RankingNeeds(SearchSpace())


def _requests(root: str, backbone, tasks=("shapes", "count")) -> dict[str, SensitivityRequest]:
    return {t: SensitivityRequest(TaskRef("mini", t, root), backbone, num_batches=2, batch_size=32) for t in tasks}


def _stats(store) -> dict:
    return ray.get(store.stats.remote())


@ray.remote(num_cpus=0.1)
def _read_on_node(handle) -> tuple[str, int, str]:
    ranking = ray.get(handle.ref)
    return ray.get_runtime_context().get_node_id(), int(ranking.ids.numel()), str(ranking.ids.dtype)


@ray.remote(num_cpus=0.1)
def _trial_fetch(context, refs, task) -> tuple[str, int]:
    ref, ranking = fetch_ranking(context, refs, task)
    return ref.hex(), int(ranking.ids.numel())


def test_concurrent_requests_compute_once_per_key_and_every_node_reads_the_ref(ray_cluster, ray_mini_root,
                                                                               ray_backbone, tmp_path):
    store = get_store(str(tmp_path))
    reqs = _requests(ray_mini_root, ray_backbone)
    # 12 requests at the same moment, 6 per key, before anything exists
    pending = [store.get_ranking.remote(reqs[t], NEEDS) for _ in range(6) for t in reqs]
    handles = [ray.get(p)[0] for p in pending]
    stats = _stats(store)
    assert (stats["computed"], stats["loaded_from_disk"], stats["served"]) == (2, 0, 12)
    assert len({h.ref.hex() for h in handles}) == 2  # every caller of a key got the same object
    assert all(h.source == "computed" and h.nbytes < h.full_map_bytes / 10 for h in handles)
    # the store lives on the head node, and its objects are readable on every node
    head = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
    assert stats["node_id"] == head
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    reads = ray.get([_read_on_node.options(scheduling_strategy=ray.util.scheduling_strategies.
                                           NodeAffinitySchedulingStrategy(node, soft=False)).remote(handles[0])
                     for node in nodes])
    assert {r[0] for r in reads} == set(nodes) and {r[1:] for r in reads} == {(handles[0].k, "torch.int32")}
    # persisted: safetensors + layout JSON + manifest with checksums, under the key
    entry = tmp_path / "sensitivity" / handles[0].key
    manifest = json.loads((entry / MANIFEST_FILE).read_text())
    assert manifest["key"] == handles[0].key and set(manifest["sha256"]) == {MAP_FILE, f"{MAP_FILE}.json"}


def test_restarted_store_reloads_from_disk_and_detects_bad_files(ray_cluster, ray_mini_root, ray_backbone, tmp_path):
    reqs = _requests(ray_mini_root, ray_backbone)
    store = get_store(str(tmp_path))
    first = fetch_rankings(store, reqs, {t: NEEDS for t in reqs})
    assert _stats(store)["computed"] == 2
    pid = _stats(store)["pid"]

    ray.kill(store, no_restart=False)  # the actor dies; Ray restarts it (max_restarts=-1)
    deadline = time.time() + 60
    while True:
        try:
            stats = _stats(store)
            if stats["pid"] != pid:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.time() < deadline, "the store actor did not restart"
        time.sleep(0.5)
    again = fetch_rankings(get_store(str(tmp_path)), reqs, {t: NEEDS for t in reqs})
    stats = _stats(store)
    assert (stats["computed"], stats["loaded_from_disk"]) == (0, 2)  # no recomputation
    for t in reqs:
        assert again[t].source == "disk" and again[t].key == first[t].key
        assert ray.get(again[t].ref).ids.numel() == first[t].k
    with pytest.raises((ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError)):
        ray.get(first["shapes"].ref, timeout=30)  # refs die with their owner: callers ask the store again
    # which is what a trial does when the ref it was given is dead: it asks the store by key
    context = TrialContext("search", "mini", ray_mini_root, ray_backbone, {}, storage_root=str(tmp_path),
                           requests=reqs, needs=NEEDS)
    ref_hex, k = ray.get(_trial_fetch.remote(context, {"shapes": first["shapes"].ref}, "shapes"))
    assert (ref_hex, k) == (again["shapes"].ref.hex(), first["shapes"].k)

    # a corrupt map (checksum) and a mismatched manifest (key) are detected, logged and recomputed
    shapes, count = (tmp_path / "sensitivity" / again[t].key for t in ("shapes", "count"))
    data = bytearray((shapes / MAP_FILE).read_bytes())
    data[-100] ^= 0xFF
    (shapes / MAP_FILE).write_bytes(bytes(data))
    manifest = json.loads((count / MANIFEST_FILE).read_text())
    manifest["key_fields"]["num_batches"] = 99
    (count / MANIFEST_FILE).write_text(json.dumps(manifest))
    ray.get(store.forget.remote())
    fixed = fetch_rankings(store, reqs, {t: NEEDS for t in reqs})
    stats = _stats(store)
    assert (stats["computed"], stats["invalid_on_disk"]) == (2, 2)
    assert {h.source for h in fixed.values()} == {"computed"}
    kinds = [e["kind"] for e in ray.get(store.stats.remote())["events"]]
    assert kinds.count("invalid") == 2
    ray.get(store.forget.remote())
    fetch_rankings(store, reqs, {t: NEEDS for t in reqs})
    assert _stats(store)["loaded_from_disk"] == 4  # the rewritten files verify again
