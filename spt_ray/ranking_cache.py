"""The derived ranking on storage, next to its map: computed with the map, cached with its own checksum,
or derived from the stored map tensor by tensor.

A reload of a stored map must not cost a read of the whole map: the ranking derived for (key, needs) is
kept as `ranking-<needs hash>.safetensors` + `.json` (its sha256 and the sha256 of the map it came from),
and a reload checks only that. Without a cached ranking, the map file is checked against its manifest in
chunks and read one logical tensor at a time (spt_ray.rankings), never whole. `compute_and_rank` is the
Ray task the store runs for a missing map: compute, persist, derive, cache, where the map was computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import time
from dataclasses import asdict
from typing import Any

import ray

from spt_core.experiment import compute_task_sensitivity
from spt_core.progress import progress_sink
from spt_core.layout import ModelLayout
from spt_core.sensitivity import Ranking

from .passes import pass_reporter
from .rankings import MapFile, derive_ranking, map_stream
from .space import RankingNeeds
from .storage import Storage
from .store import (LAYOUT_FILE, MAP_FILE, MapUnavailable, SensitivityRequest, _canonical, _manifest, _verified,
                    entry_dir, persist_map, sha256)

logger = logging.getLogger(__name__)


def needs_id(needs: RankingNeeds) -> str:
    return hashlib.sha256(_canonical(asdict(needs)).encode()).hexdigest()[:16]


def _ranking_base(storage: Storage, key: str, needs: RankingNeeds) -> str:
    return f"{entry_dir(storage, key)}/ranking-{needs_id(needs)}"


def save_ranking(storage: Storage, key: str, needs: RankingNeeds, ranking: Ranking, info: dict[str, Any],
                 map_sha256: str) -> None:
    """Keep the derived ranking next to its map with its own sha256 and the sha256 of the map it came from:
    a reload reads and checks this small file only, and a recomputed map (new checksum) makes it stale."""
    from safetensors.torch import save

    blob = save({"ids": ranking.ids.contiguous(), "scores": ranking.scores.contiguous()})
    base = _ranking_base(storage, key, needs)
    storage.write_bytes(f"{base}.safetensors", blob)
    doc = {"sha256": sha256(blob), "map_sha256": map_sha256, "info": info, "meta": ranking.meta,
           "num_entries": ranking.num_entries}
    storage.write_bytes(f"{base}.json", _canonical(doc).encode())


def _cached_ranking(storage: Storage, key_fields: dict[str, Any], needs: RankingNeeds, manifest: dict[str, Any],
                    layout: ModelLayout):
    """The cached ranking for (key, needs), or None when there is none, it fails its own checksum, or it
    was derived from another version of the map."""
    from safetensors.torch import load

    base = _ranking_base(storage, key_fields["key"], needs)
    if not storage.exists(f"{base}.json"):
        return None
    try:
        doc = json.loads(storage.read_bytes(f"{base}.json"))
        if doc.get("map_sha256") != manifest["sha256"][MAP_FILE]:
            raise MapUnavailable("mismatch", "derived from another version of the map")
        tensors = load(_verified(storage, f"{base}.safetensors", doc["sha256"], "cached ranking"))
    except (MapUnavailable, OSError, ValueError, KeyError) as err:
        logger.warning("sensitivity store: ignoring the cached ranking of key %s: %s", key_fields["key"], err)
        return None
    ranking = Ranking(tensors["ids"], tensors["scores"], layout, int(doc["num_entries"]), doc["meta"])
    return ranking, {**doc["info"], "sensitivity_s": float(manifest["meta"].get("seconds", 0.0)), "cached": True}


def _derive_from_file(storage: Storage, key: str, manifest: dict[str, Any], layout: ModelLayout,
                      needs: RankingNeeds) -> tuple[Ranking, dict[str, Any]]:
    """Check the map file against its manifest and derive the ranking from it, one tensor at a time."""
    try:
        with MapFile(storage, f"{entry_dir(storage, key)}/{MAP_FILE}", layout) as mapfile:
            if mapfile.sha256() != manifest["sha256"][MAP_FILE]:
                raise MapUnavailable("corrupt", f"{MAP_FILE} of key {key} fails its sha256 check")
            return derive_ranking(mapfile.stream, layout, needs.depths(layout))
    except (OSError, ValueError, KeyError, struct.error) as err:
        raise MapUnavailable("corrupt", f"stored map of key {key} does not load: {err}") from None


def rank_from_disk(storage: Storage, key_fields: dict[str, Any], needs: RankingNeeds):
    """The ranking from storage: the cached one (checked by its own sha256, the map is not read), else
    derived from the map (read tensor by tensor, checked against its manifest) and cached.

    Returns ("ok", ranking, info) or ("unavailable", reason, message).
    """
    key = key_fields["key"]
    try:
        manifest = _manifest(storage, key_fields)
        layout_blob = _verified(storage, f"{entry_dir(storage, key)}/{LAYOUT_FILE}", manifest["sha256"][LAYOUT_FILE],
                                f"{LAYOUT_FILE} of key {key}")
        try:
            layout = ModelLayout.from_dict(json.loads(layout_blob)["layout"])
        except (ValueError, KeyError, TypeError) as err:
            raise MapUnavailable("corrupt", f"{LAYOUT_FILE} of key {key} does not load: {err}") from None
        cached = _cached_ranking(storage, key_fields, needs, manifest, layout)
        if cached is not None:
            return "ok", *cached
        ranking, info = _derive_from_file(storage, key, manifest, layout, needs)
    except MapUnavailable as err:
        if err.reason == "missing":
            logger.info("sensitivity store: %s; computing it", err)
        else:  # a map was stored and cannot be used: say why it is recomputed
            logger.warning("sensitivity store: %s [%s]; recomputing the map", err, err.reason)
        return "unavailable", err.reason, str(err)
    info["sensitivity_s"] = float(manifest["meta"].get("seconds", 0.0))
    save_ranking(storage, key, needs, ranking, info, manifest["sha256"][MAP_FILE])
    return "ok", ranking, info


@ray.remote(max_retries=2)
def compute_and_rank(storage: Storage, key_fields: dict[str, Any], request: SensitivityRequest, needs: RankingNeeds,
                     reporter: Any = None):
    """Compute the map (on a GPU when this task was given one), persist it, derive the ranking. `reporter`
    (the store actor) hears of every batch, for the driver's progress bar."""
    os.environ.setdefault("SPT_NO_PROGRESS", "1")
    start = time.perf_counter()
    with progress_sink(pass_reporter(reporter, key_fields["key"], request.task.task)):
        smap = compute_task_sensitivity(request.task, request.backbone, split=request.split,
                                        num_batches=request.num_batches, batch_size=request.batch_size,
                                        seed=request.seed, device="auto", progress=False)
    seconds = time.perf_counter() - start
    smap.meta.update(wall_s=seconds, node_id=ray.get_runtime_context().get_node_id(), host=socket.gethostname())
    manifest = persist_map(storage, key_fields, smap)
    ranking, info = derive_ranking(map_stream(smap), smap.layout, needs.depths(smap.layout))
    info["sensitivity_s"] = seconds
    save_ranking(storage, key_fields["key"], needs, ranking, info, manifest["sha256"][MAP_FILE])
    return "ok", ranking, info
