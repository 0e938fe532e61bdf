"""The sensitivity store: one detached, named Ray actor that hands every trial its task's ranking.

Why an actor: a sensitivity map is the one expensive, shared input of a sweep (a pass over 512 images
with the whole backbone unfrozen), and every trial of a task needs the same one. The store

* computes a map at most once per key, as a Ray task that may claim a GPU, even when many trials ask
  at the same moment (requests for one key wait on one per-key lock; the pending compute ObjectRef is
  kept in `inflight` while it runs);
* persists it under `<storage>/sensitivity/<key>/` (safetensors + JSON, then a manifest of their sha256,
  each file written whole and renamed into place) so a later sweep, a resumed sweep or a restarted actor
  reloads it instead of recomputing; a missing manifest, a checksum or a key mismatch is logged and the
  map is recomputed;
* `ray.put`s, from the actor itself, only what trials need: each tensor's top entries down to the
  deepest switch threshold of the space (spt_ray.rankings: exact at every budget; 3.5% of the fp32 map
  for ViT-B/16 and the VTAB space) as numpy arrays (`PackedRanking`), which every trial on a node reads
  zero-copy from one buffer. Put by a detached actor, objects outlive the driver. Sweep runs hold the
  rankings they asked for and release them at their end; rankings no run holds are dropped;
* reloads the derived ranking cached next to the map, or derives it from the map read tensor by tensor
  (spt_ray.ranking_cache), at most `max_reloads` at once; across drivers sharing a storage, one computes a
  map and the others wait for it (spt_ray.maplock). Only a configuration outside the space the ranking
  was sized for reads the full map (in the trial); the store counts those reads (`full_map_reads`).

The actor is pinned to the head node (node affinity on the head's node id) and reserves no CPU, so it
never holds a slot trials could use and dies only with the cluster. Computing a map runs as a Ray task (it
may claim a GPU; it verifies, persists and ranks where it computed); reloading a stored map runs on a
thread of the actor (a one-off burst of CPU per key, and no worker process to start).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from spt_core.backbones import RANDOM, default_weights
from spt_core.experiment import BackboneRef, TaskRef, sensitivity_key
from spt_core.data.fingerprint import split_fingerprint
from spt_core.sensitivity import SensitivityMap, check_sensitivity_split

from .maplock import MapLock, once_across_drivers
from .memory import release_freed_memory
from .passes import PassBoard, fetch_rankings  # noqa: F401  (fetch_rankings: the store's blocking API)
from .space import RankingNeeds
from .storage import Storage

logger = logging.getLogger(__name__)

STORE_NAME = "spt-sensitivity-store"
NAMESPACE = "spt-ray"
MAP_FILE = "map.safetensors"
LAYOUT_FILE = "map.safetensors.json"  # written by SensitivityMap.save next to the safetensors
MANIFEST_FILE = "manifest.json"  # written last: its presence commits the entry
FORMAT = "spt-sensitivity/1"


@dataclass(frozen=True)
class SensitivityRequest:
    """Which map: everything that changes its values is part of the key (see spt_core sensitivity_key)."""

    task: TaskRef
    backbone: BackboneRef
    split: str | None = None
    num_batches: int = 16
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_sensitivity_split(self.split, self.task.suite)  # a map scored on val / test leaks evaluation data

    @property
    def data_split(self) -> str:
        return self.split or self.task.sensitivity_split

    def data_fingerprint(self) -> dict[str, Any]:
        """What the pass reads (list files' bytes, each image's size + mtime): cheap, so taken per request."""
        return split_fingerprint(self.task.suite, self.task.data_root, self.task.task, self.data_split)

    def key_fields(self, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """The key's fields; `data` is this request's data_fingerprint() when the caller already took it."""
        return sensitivity_key(self.task, self.backbone, split=self.split, num_batches=self.num_batches,
                               batch_size=self.batch_size, seed=self.seed, data=data)

    def weights_signature(self) -> tuple[str, int, int] | None:
        """(path, size, mtime) of the weights file the key hashes: a cheap test that the key is still valid."""
        path = self.backbone.weights if self.backbone.weights not in (None, RANDOM) else default_weights(
            self.backbone.name)
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            return None
        return (str(path), st.st_size, st.st_mtime_ns) if st is not None else None


@dataclass(frozen=True)
class RankingHandle:
    """What a caller gets: the ranking's ObjectRef plus what to record about it (no array data)."""

    key: str
    key_fields: dict[str, Any]
    ref: ray.ObjectRef
    k: int  # top entries held
    num_entries: int  # entries in the full map
    nbytes: int  # ids + scores in the object store
    full_map_bytes: int  # the full fp32 map, for comparison
    total_params: int  # backbone parameters, head excluded (what fractional budgets refer to)
    sensitivity_s: float  # seconds the map took to compute (when it was computed)
    source: str  # "computed" | "disk": how the store obtained the map for this ranking
    info: dict[str, Any] = field(default_factory=dict)


# ---- persistence (runs inside Ray tasks) -------------------------------------------------------
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry_dir(storage: Storage, key: str) -> str:
    return storage.path("sensitivity", key)


def persist_map(storage: Storage, key_fields: dict[str, Any], smap: SensitivityMap) -> dict[str, Any]:
    """Write the map, its layout JSON, then the manifest (checksums + key) that makes the entry valid."""
    key = key_fields["key"]
    d = entry_dir(storage, key)
    with tempfile.TemporaryDirectory(prefix="spt-map-") as tmp:
        smap.save(Path(tmp) / MAP_FILE)
        blobs = {name: (Path(tmp) / name).read_bytes() for name in (MAP_FILE, LAYOUT_FILE)}
    for name, data in blobs.items():
        storage.write_bytes(f"{d}/{name}", data)
    manifest = {"format": FORMAT, "key": key, "key_fields": key_fields,
                "sha256": {name: sha256(data) for name, data in blobs.items()},
                "bytes": {name: len(data) for name, data in blobs.items()},
                "meta": smap.meta, "created_at": time.time(), "host": socket.gethostname()}
    storage.write_bytes(f"{d}/{MANIFEST_FILE}", json.dumps(manifest, indent=1, default=str).encode())
    return manifest


class MapUnavailable(Exception):
    """No valid map on disk for a key; `reason` is "missing", "incomplete", "corrupt" or "mismatch"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _manifest(storage: Storage, key_fields: dict[str, Any]) -> dict[str, Any]:
    """The entry's manifest, checked against the request; MapUnavailable if absent, unreadable or another key.

    A manifest missing next to map files ("incomplete": deleted, or a write that never finished) is told
    apart from an entry that was never written ("missing"): only the latter is a normal first computation.
    """
    key = key_fields["key"]
    d = entry_dir(storage, key)
    path = f"{d}/{MANIFEST_FILE}"
    if not storage.exists(path):
        if any(storage.exists(f"{d}/{name}") for name in (MAP_FILE, LAYOUT_FILE)):
            raise MapUnavailable("incomplete", f"manifest {path} is missing next to its map files "
                                               "(deleted, or a write that never finished)")
        raise MapUnavailable("missing", f"no stored sensitivity map for key {key} (no {path})")
    try:
        manifest = json.loads(storage.read_bytes(path))
    except (OSError, ValueError) as err:
        raise MapUnavailable("corrupt", f"manifest {path} is unreadable: {type(err).__name__}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("key") != key:
        found = manifest.get("key") if isinstance(manifest, dict) else None
        raise MapUnavailable("mismatch", f"manifest {path} names key {found!r}, not {key}")
    if _canonical(manifest.get("key_fields", {})) != _canonical(key_fields):
        raise MapUnavailable("mismatch", f"manifest {path}: stored key fields differ from the request")
    if set(manifest.get("sha256", {})) != {MAP_FILE, LAYOUT_FILE}:
        raise MapUnavailable("corrupt", f"manifest {path} does not cover {MAP_FILE} and {LAYOUT_FILE}")
    return manifest


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _verified(storage: Storage, path: str, digest: str, what: str) -> bytes:
    try:
        data = storage.read_bytes(path)
    except OSError as err:
        raise MapUnavailable("corrupt", f"{what} unreadable: {err}") from None
    if sha256(data) != digest:
        raise MapUnavailable("corrupt", f"{what} fails its sha256 check")
    return data


def _verified_blobs(storage: Storage, key_fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the bytes of every file it covers, each checked against its sha256."""
    manifest = _manifest(storage, key_fields)
    d = entry_dir(storage, key_fields["key"])
    return manifest, {name: _verified(storage, f"{d}/{name}", digest, f"{name} of key {key_fields['key']}")
                      for name, digest in manifest["sha256"].items()}


def _map_from_blobs(blobs: dict[str, bytes], key: str) -> SensitivityMap:
    with tempfile.TemporaryDirectory(prefix="spt-map-") as tmp:
        for name, data in blobs.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            return SensitivityMap.load(Path(tmp) / MAP_FILE)
        except Exception as err:  # a valid checksum over a file spt_core cannot read: treat as corrupt
            raise MapUnavailable("corrupt", f"stored map of key {key} does not load: {err}") from None


def load_map(storage: Storage, key_fields: dict[str, Any]) -> SensitivityMap:
    """The stored map for this key, verified against its manifest; MapUnavailable if absent or bad."""
    _, blobs = _verified_blobs(storage, key_fields)
    return _map_from_blobs(blobs, key_fields["key"])


# ---- the actor ----------------------------------------------------------------------------------
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class SensitivityStore(PassBoard):
    """See the module docstring. Async: many trials wait on one computation without blocking others."""

    def __init__(self, storage: str, num_gpus: float = 0.0, num_cpus: float = 1.0, max_reloads: int = 2,
                 lock_stale_s: float = 120.0):
        self.storage = Storage.of(storage)
        self.num_gpus, self.num_cpus = float(num_gpus), float(num_cpus)
        self.lock_stale_s = float(lock_stale_s)  # a compute lock not refreshed for this long was abandoned
        self.counters: Counter[str] = Counter(computed=0, loaded_from_disk=0, served=0, invalid_on_disk=0,
                                              full_map_reads=0, evicted=0, peak_reloads=0)
        self.handles: dict[tuple[str, RankingNeeds], RankingHandle] = {}
        self.holders: dict[tuple[str, RankingNeeds], set[str]] = {}  # the sweeps that still use each ranking
        self.full_map_reads: Counter[str] = Counter()  # per holder
        self.reloads = asyncio.Semaphore(max_reloads)  # disk reloads at once: each holds a tensor and a ranking
        self.reloading = 0
        self.key_cache: dict[tuple[SensitivityRequest, Any], dict[str, Any]] = {}
        self.inflight: dict[str, ray.ObjectRef] = {}  # key -> pending compute task
        self.locks: dict[str, asyncio.Lock] = {}
        self.events: list[dict[str, Any]] = []
        self.passes: dict[str, dict[str, Any]] = {}  # key -> task, done, total of a sensitivity pass running now
        self.started_at = time.time()

    async def get_ranking(self, request: SensitivityRequest, needs: RankingNeeds,
                          holder: str | None = None) -> list[RankingHandle]:
        """The handle (its `.ref` is the ranking's ObjectRef), wrapped in a list so callers get the ref.
        `holder` (a sweep run) keeps the ranking in memory until it calls `release`."""
        self.counters["served"] += 1
        key_fields = await self._key_fields(request)
        key = key_fields["key"]
        async with self.locks.setdefault(key, asyncio.Lock()):
            handle = self.handles.get((key, needs))
            if handle is None:
                handle = await self._materialize(key_fields, request, needs)
                self.handles[(key, needs)] = handle
            held = self.holders.setdefault((key, needs), set())
            if holder is not None:
                held.add(holder)
        return [handle]

    def release(self, holder: str) -> int:
        """A sweep run is done with its rankings: drop every ranking no holder uses any more (the object
        store frees it once trials still reading it let go). Returns how many were dropped."""
        dropped = 0
        for slot, held in list(self.holders.items()):
            held.discard(holder)
            if not held:
                self.handles.pop(slot, None)
                del self.holders[slot]
                dropped += 1
        self.counters["evicted"] += dropped
        self.full_map_reads.pop(holder, None)
        return dropped

    def record_full_map_read(self, key: str, needs: RankingNeeds) -> None:
        """A trial needed the whole map (a configuration outside the space the ranking was sized for)."""
        self.counters["full_map_reads"] += 1
        for holder in self.holders.get((key, needs), ()):
            self.full_map_reads[holder] += 1
        self._event("full-map-read", key)

    async def _key_fields(self, request: SensitivityRequest) -> dict[str, Any]:
        """The request's key, hashed once per weights file version and data version (hashing the weights may
        build the backbone; the data fingerprint is a stat per image, taken on every request, so a changed
        copy of the data gets a new key even while this detached actor lives on)."""
        data = await asyncio.to_thread(request.data_fingerprint)
        slot = (request, request.weights_signature(), data["sha256"])
        if slot not in self.key_cache:
            self.key_cache[slot] = await asyncio.to_thread(request.key_fields, data)
            release_freed_memory()  # hashing the weights may have built the backbone
        return self.key_cache[slot]

    async def _reload(self, key_fields: dict[str, Any], needs: RankingNeeds) -> tuple[Any, ...]:
        """rank_from_disk on a thread, at most `max_reloads` at once."""
        from .ranking_cache import rank_from_disk  # it builds on this module's persistence

        async with self.reloads:
            self.reloading += 1
            self.counters["peak_reloads"] = max(self.counters["peak_reloads"], self.reloading)
            try:
                return await asyncio.to_thread(rank_from_disk, self.storage, key_fields, needs)
            finally:
                self.reloading -= 1
                release_freed_memory()  # the map's tensors read on a pool thread, whose arena keeps them

    async def _compute(self, key_fields: dict[str, Any], request: SensitivityRequest,
                       needs: RankingNeeds) -> tuple[Any, ...]:
        from .ranking_cache import compute_and_rank

        key = key_fields["key"]
        ref = compute_and_rank.options(num_gpus=self.num_gpus, num_cpus=self.num_cpus).remote(
            self.storage, key_fields, request, needs, ray.get_runtime_context().current_actor)
        self.inflight[key] = ref
        try:
            return await ref
        finally:
            self.inflight.pop(key, None)
            self.passes.pop(key, None)

    async def _materialize(self, key_fields: dict[str, Any], request: SensitivityRequest,
                           needs: RankingNeeds) -> RankingHandle:
        key = key_fields["key"]
        status, *rest = await self._reload(key_fields, needs)
        if status == "ok":
            self.counters["loaded_from_disk"] += 1
            source = "disk"
        else:
            reason, message = rest  # rank_from_disk logged why
            if reason != "missing":
                self.counters["invalid_on_disk"] += 1
            self._event("invalid" if reason != "missing" else "missing", key, reason=reason, message=message)

            async def reloaded() -> tuple[Any, ...] | None:  # the map another driver computed meanwhile
                out = await self._reload(key_fields, needs)
                return out if out[0] == "ok" else None

            lock = MapLock(self.storage, entry_dir(self.storage, key), self.lock_stale_s)
            how, (status, *rest) = await once_across_drivers(
                lock, lambda: self._compute(key_fields, request, needs), reloaded)
            source = "computed" if how == "computed" else "disk"
            self.counters["computed" if how == "computed" else "loaded_from_disk"] += 1
            if how == "waited":
                self._event("waited", key, message="another driver computed this map")
        ranking, info = rest
        ref = ray.put(ranking.pack())  # numpy: zero-copy reads; owned by this detached actor: outlives drivers
        self._event(source, key, k=info["k"], nbytes=info["nbytes"])
        return RankingHandle(key, key_fields, ref, info["k"], info["num_entries"], info["nbytes"],
                             info["full_map_bytes"], info["total_params"], info["sensitivity_s"], source, info)

    def _event(self, kind: str, key: str, **extra: Any) -> None:
        self.events.append({"kind": kind, "key": key, "time": time.time(), **extra})

    def stats(self, holder: str | None = None) -> dict[str, Any]:
        """Counters (computed, loaded_from_disk, served, invalid_on_disk, full_map_reads, evicted,
        peak_reloads), in-flight keys and events; with `holder`, `full_map_reads` counts that run's only."""
        counters = dict(self.counters)
        if holder is not None:
            counters.update(full_map_reads=self.full_map_reads[holder],
                            full_map_reads_all=self.counters["full_map_reads"])
        return {**counters, "inflight": sorted(self.inflight), "keys": sorted({k for k, _ in self.handles}),
                "events": list(self.events), "started_at": self.started_at, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def forget(self) -> None:
        """Drop the in-memory handles (the next request reloads from disk); for tests and `spt-ray` tools."""
        self.handles.clear()
        self.holders.clear()


def head_node_id() -> str | None:
    """The node id of the cluster's head (Ray marks it with the `node:__internal_head__` resource)."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return None


def store_actor_name(storage: str | os.PathLike, name: str = STORE_NAME) -> str:
    """The store's actor name for `storage` (in NAMESPACE): one store per storage root."""
    return f"{name}-{hashlib.sha256(Storage.of(storage).root.encode()).hexdigest()[:10]}"


def get_store(storage: str | os.PathLike, *, num_gpus: float = 0.0, num_cpus: float = 1.0,
              name: str = STORE_NAME, max_reloads: int = 2, lock_stale_s: float = 120.0) -> ray.actor.ActorHandle:
    """The store actor of this cluster for `storage`, created (detached, on the head node) if needed.

    One store per storage root: the actor name carries a hash of the root, so two sweeps writing to
    different storages never share maps by accident.
    """
    root, head = Storage.of(storage).root, head_node_id()
    options: dict[str, Any] = dict(name=store_actor_name(root, name), namespace=NAMESPACE, lifetime="detached",
                                   get_if_exists=True)
    if head is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=head, soft=False)
    return SensitivityStore.options(**options).remote(root, num_gpus, num_cpus, max_reloads, lock_stale_s)

