"""The sensitivity store on a real 3-node Ray cluster: one computation per key under concurrent requests,
reload from disk after an actor restart, detection of corrupt or mismatched files, refs readable
from every node, zero-copy reads, rankings released by the sweeps that held them, full-map reads counted."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import ray

from spt_core import compute_sensitivity
from spt_core.experiment import TaskRef
from spt_ray.space import RankingNeeds, SearchSpace
from spt_ray.storage import Storage
from spt_ray.ranking_cache import rank_from_disk
from spt_ray.store import MANIFEST_FILE, MAP_FILE, SensitivityRequest, fetch_rankings, get_store, persist_map
from spt_ray.trainable import TrialContext, fetch_ranking
from tests.conftest import random_batches, tiny_vit

NEEDS = RankingNeeds(SearchSpace())


def _requests(root: str, backbone, tasks=("shapes", "count")) -> dict[str, SensitivityRequest]:
    return {t: SensitivityRequest(TaskRef("mini", t, root), backbone, num_batches=2, batch_size=32) for t in tasks}


def _stats(store, holder=None) -> dict:
    return ray.get(store.stats.remote(holder))


def _flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


@ray.remote(num_cpus=0.1)
def _read_on_node(handle) -> tuple[str, int, str]:
    ranking = ray.get(handle.ref)
    return ray.get_runtime_context().get_node_id(), int(ranking.ids.size), str(ranking.ids.dtype)


@ray.remote(num_cpus=0.1)
def _trial_fetch(context, refs, task) -> tuple[str, int]:
    ref, ranking = fetch_ranking(context, refs, task)
    return ref.hex(), int(ranking.ids.numel())


@pytest.mark.slow
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
    assert all(h.source == "computed" and h.nbytes < h.full_map_bytes / 3 for h in handles)  # ViT-B: 3.5%
    # the store lives on the head node, and its objects are readable on every node
    head = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
    assert stats["node_id"] == head
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    reads = ray.get([_read_on_node.options(scheduling_strategy=ray.util.scheduling_strategies.
                                           NodeAffinitySchedulingStrategy(node, soft=False)).remote(handles[0])
                     for node in nodes])
    assert {r[0] for r in reads} == set(nodes) and {r[1:] for r in reads} == {(handles[0].k, "int32")}
    # persisted: safetensors + layout JSON + manifest with checksums, under the key
    entry = tmp_path / "sensitivity" / handles[0].key
    manifest = json.loads((entry / MANIFEST_FILE).read_text())
    assert manifest["key"] == handles[0].key and set(manifest["sha256"]) == {MAP_FILE, f"{MAP_FILE}.json"}


@pytest.mark.slow
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
        assert ray.get(again[t].ref).ids.size == first[t].k
    with pytest.raises((ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError)):
        ray.get(first["shapes"].ref, timeout=30)  # refs die with their owner: callers ask the store again
    # which is what a trial does when the ref it was given is dead: it asks the store by key
    context = TrialContext("search", "mini", ray_mini_root, ray_backbone, {}, storage_root=str(tmp_path),
                           requests=reqs, needs=NEEDS)
    ref_hex, k = ray.get(_trial_fetch.remote(context, {"shapes": first["shapes"].ref}, "shapes"))
    assert (ref_hex, k) == (again["shapes"].ref.hex(), first["shapes"].k)

    # a reload reads the cached ranking (its own checksum), not the map: a corrupt map behind it goes unread
    shapes, count = (tmp_path / "sensitivity" / again[t].key for t in ("shapes", "count"))
    _flip_byte(shapes / MAP_FILE)
    ray.get(store.forget.remote())
    fetch_rankings(store, reqs, {t: NEEDS for t in reqs})
    assert (_stats(store)["computed"], _stats(store)["loaded_from_disk"]) == (0, 4)
    # a corrupt cached ranking sends the store to the map, which fails its checksum, and a mismatched
    # manifest (key): both detected, logged and recomputed
    _flip_byte(next(shapes.glob("ranking-*.safetensors")))
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
    assert _stats(store)["loaded_from_disk"] == 6  # the rewritten files verify again


# ---- why a stored map is recomputed is said, in the log and in the store's events ----------------------
def _stored_entry(tmp_path) -> tuple[Storage, dict]:
    storage = Storage.of(str(tmp_path))
    key_fields = {"key": "k-test", "task": "shapes"}
    persist_map(storage, key_fields, compute_sensitivity(tiny_vit(), random_batches(1), progress=False))
    return storage, key_fields


def test_a_deleted_or_unreadable_manifest_is_logged_with_its_path_and_reason(tmp_path, caplog):
    storage, key_fields = _stored_entry(tmp_path)
    manifest = tmp_path / "sensitivity" / "k-test" / MANIFEST_FILE
    caplog.set_level(logging.INFO)
    assert rank_from_disk(storage, {"key": "never-written"}, NEEDS)[:2] == ("unavailable", "missing")
    assert [r.levelno for r in caplog.records] == [logging.INFO]  # a first computation is no warning
    caplog.clear()

    manifest.write_text("{ not json")
    status, reason, message = rank_from_disk(storage, key_fields, NEEDS)
    assert (status, reason) == ("unavailable", "corrupt") and str(manifest) in message
    caplog.clear()

    manifest.unlink()  # deleted: the map files are still there
    status, reason, message = rank_from_disk(storage, key_fields, NEEDS)
    assert (status, reason) == ("unavailable", "incomplete")
    [record] = caplog.records
    assert record.levelno == logging.WARNING and str(manifest) in record.getMessage()
    assert "missing next to its map files" in record.getMessage() and "recomputing" in record.getMessage()


@pytest.mark.slow
def test_changed_data_gets_a_new_key_and_a_deleted_manifest_is_recomputed_with_a_reason(
        ray_cluster, ray_mini_root, ray_backbone, tmp_path):
    """The real store on a real generated mini task: an unchanged copy reuses the map, an edited list or a
    replaced image computes a new one, and a deleted manifest is recomputed with its reason in the events."""
    root = tmp_path / "data"
    shutil.copytree(Path(ray_mini_root) / "shapes", root / "shapes", copy_function=shutil.copy2)
    store = get_store(str(tmp_path / "storage"))

    def fetch(data_root: Path):
        request = SensitivityRequest(TaskRef("mini", "shapes", str(data_root)), ray_backbone, num_batches=2)
        return fetch_rankings(store, {"shapes": request}, {"shapes": NEEDS})["shapes"]

    first = fetch(Path(ray_mini_root))  # the original data
    assert fetch(root).key == first.key and _stats(store)["computed"] == 1  # an unchanged copy: same map
    listed = root / "shapes" / "train800.txt"
    lines = listed.read_text().splitlines()
    listed.write_text("\n".join(lines[:-1]) + "\n")
    edited = fetch(root)
    image = root / "shapes" / lines[0].split()[0]
    shutil.copyfile(root / "shapes" / lines[1].split()[0], image)
    replaced = fetch(root)
    assert len({first.key, edited.key, replaced.key}) == 3 and {edited.source, replaced.source} == {"computed"}
    assert _stats(store)["computed"] == 3

    (tmp_path / "storage" / "sensitivity" / replaced.key / MANIFEST_FILE).unlink()
    ray.get(store.forget.remote())
    again = fetch(root)
    stats = _stats(store)
    assert again.key == replaced.key and again.source == "computed"
    assert (stats["computed"], stats["invalid_on_disk"]) == (4, 1)
    [event] = [e for e in stats["events"] if e["kind"] == "invalid"]
    assert event["reason"] == "incomplete" and MANIFEST_FILE in event["message"]


# ---- zero-copy reads, rankings held per sweep run, full-map reads counted ---------------------------------
@ray.remote(num_cpus=0.1)
def _trial_reads(context, refs, task, reads: int) -> dict:
    """A worker process reading the ranking as a trial does (`fetch_ranking`), `reads` times, keeping all.
    Growth of RssAnon, its private resident bytes: a copy of the ranking lands there; the object store's
    shared memory, which zero-copy reads map, does not."""
    def rss_anon() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon:"))

    fetch_ranking(context, refs, task)  # the first read in a process maps the shared memory
    before = rss_anon()
    held = [fetch_ranking(context, refs, task)[1] for _ in range(reads)]
    return {"growth": rss_anon() - before, "pointers": len({r.ids.data_ptr() for r in held}),
            "score_pointers": len({r.scores.data_ptr() for r in held}), "nbytes": held[0].nbytes}


@pytest.mark.slow
def test_reads_share_one_buffer_and_runs_release_their_rankings(ray_cluster, ray_mini_root, ray_backbone, tmp_path):
    reqs = _requests(ray_mini_root, ray_backbone, tasks=("shapes",))
    # alpha down to 0.1: every matrix threshold exceeds its tensor, so the ranking is almost the whole map (4 MB)
    needs = RankingNeeds(SearchSpace.from_dict({"alpha": [0.1, 40.0]}))
    store = get_store(str(tmp_path), max_reloads=1)
    handle = fetch_rankings(store, reqs, {"shapes": needs}, holder="sweep-a")["shapes"]
    assert handle.k > 0.95 * handle.num_entries and handle.nbytes > 2**21
    context = TrialContext("search", "mini", ray_mini_root, ray_backbone, {}, storage_root=str(tmp_path),
                           requests=reqs, needs=needs)
    refs = {"shapes": handle.ref}
    for out in ray.get([_trial_reads.remote(context, refs, "shapes", 6) for _ in range(2)]):  # two trials
        assert out["pointers"] == out["score_pointers"] == 1 and out["nbytes"] == handle.nbytes
        assert out["growth"] < handle.nbytes / 2, out  # a private copy per read would add 6 x nbytes

    # the store keeps a ranking while some sweep run holds it and drops it when the last one releases it
    fetch_rankings(store, reqs, {"shapes": needs}, holder="sweep-b")
    assert ray.get(store.release.remote("sweep-a")) == 0 and _stats(store)["keys"] == [handle.key]
    # a trial outside the ranking's space reads the full map; the store counts it for the runs holding it
    ray.get(store.record_full_map_read.remote(handle.key, needs))
    assert _stats(store, "sweep-b")["full_map_reads"] == 1 and _stats(store, "other")["full_map_reads"] == 0
    assert ray.get(store.release.remote("sweep-b")) == 1
    stats = _stats(store)
    assert stats["keys"] == [] and stats["evicted"] == 1
    # reloads from disk run one at a time here (max_reloads=1): the cached ranking, not a recomputation
    both = _requests(ray_mini_root, ray_backbone)
    fetch_rankings(store, both, {t: NEEDS for t in both})
    ray.get(store.forget.remote())
    fetch_rankings(store, both, {t: NEEDS for t in both})
    stats = _stats(store)
    assert stats["peak_reloads"] == 1 and stats["loaded_from_disk"] == 3 and stats["computed"] == 2


@pytest.mark.slow
def test_two_stores_sharing_a_storage_compute_a_map_once(ray_cluster, ray_mini_root, ray_backbone, tmp_path):
    """Two drivers (two clusters) on one storage each run a store; two named stores of this cluster stand for
    them: asked for the same missing map at the same moment, one computes it and the other loads it."""
    reqs = _requests(ray_mini_root, ray_backbone, tasks=("shapes",))
    stores = [get_store(str(tmp_path), name=f"driver-{i}") for i in range(2)]
    handles = ray.get([store.get_ranking.remote(reqs["shapes"], NEEDS) for store in stores])
    stats = [_stats(store) for store in stores]
    assert sorted(h[0].source for h in handles) == ["computed", "disk"] and handles[0][0].key == handles[1][0].key
    assert [sum(s[c] for s in stats) for c in ("computed", "loaded_from_disk")] == [1, 1]
    assert not list(tmp_path.rglob("compute.lock"))  # released
    for store in stores:
        ray.kill(store)
