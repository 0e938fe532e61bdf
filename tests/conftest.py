"""Shared fixtures. Environment for Ray and progress bars is set before anything imports them."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPT_NO_PROGRESS", "1")

from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from tests.tiny_tune import FinishedTune, run_tiny_tune  # noqa: E402

if TYPE_CHECKING:
    from tests.searched_sweep import SearchedSweep

torch.set_num_threads(2)


def tiny_vit(num_classes: int = 5, depth: int = 2, seed: int = 0, drop_path_rate: float = 0.0) -> torch.nn.Module:
    """A 32 px ViT small enough for exhaustive checks (dim 48, 3 heads)."""
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=32,
                             patch_size=8, embed_dim=48, depth=depth, num_heads=3, drop_path_rate=drop_path_rate)


def random_batches(n: int = 3, batch: int = 4, num_classes: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, num_classes, (batch,), generator=g))
            for _ in range(n)]


@pytest.fixture
def vit():
    return tiny_vit()


# ---- spt_ray fixtures: a tiny mini suite, a backbone, one multi-node Ray cluster per session ----------
RAY_TASKS = ("shapes", "count")
RAY_SIZES = (96, 64, 64)  # train800 / val200 / test images per task: enough to train a step or three
RAY_OBJECT_STORE = 96 * 1024 * 1024


@pytest.fixture(scope="session")
def ray_mini_root(tmp_path_factory) -> str:
    """Two tasks of the embedded mini suite, shrunk for speed (same layout and loader as the real one)."""
    from spt_core.data.mini import write_mini_suite

    root = tmp_path_factory.mktemp("ray-mini")
    write_mini_suite(root, seed=0, tasks=list(RAY_TASKS), sizes=RAY_SIZES)
    return str(root)


@pytest.fixture(scope="session")
def ray_backbone(tmp_path_factory):
    """The shipped spt-mini-vit when its weights exist, else the same architecture saved with seeded random
    weights (a real local weights file, so hashing and loading go through the same code)."""
    from safetensors.torch import save_file
    from spt_core.embedded import EMBEDDED_WEIGHTS, build_embedded_vit
    from spt_core.experiment import BackboneRef

    if EMBEDDED_WEIGHTS.is_file():
        return BackboneRef()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ray-backbone") / "spt_mini_vit_random.safetensors"
    save_file({k: v.contiguous() for k, v in build_embedded_vit(10).state_dict().items()}, str(path))
    return BackboneRef(weights=str(path))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real 3-node Ray cluster on this machine (head + 2 workers, 2 logical CPUs each), driver connected.

    Short temp dir (unix socket paths), no dashboard; torn down at the end of the session.
    """
    import shutil

    import ray
    from ray.cluster_utils import Cluster

    base = f"/tmp/ray-spt-{os.getpid()}"  # short: unix socket paths must stay under 107 bytes
    os.makedirs(f"{base}/ray", exist_ok=True)
    os.environ["RAY_TMPDIR"] = base  # Ray's address file goes here too, not into a shared /tmp/ray
    temp_dir = f"{base}/ray"
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=2, object_store_memory=RAY_OBJECT_STORE, include_dashboard=False, temp_dir=temp_dir))
    for _ in range(2):
        cluster.add_node(num_cpus=2, object_store_memory=RAY_OBJECT_STORE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(base, ignore_errors=True)


# ---- finished sweeps that several test modules read (none of them changes what the sweep wrote) ----------
@pytest.fixture(scope="session")
def tiny_tune(ray_cluster, ray_mini_root, ray_backbone, tmp_path_factory) -> FinishedTune:
    """One uninterrupted `spt-ray tune --json` subprocess of tests/tiny_tune.py's sweep: the fault drills compare
    their resumed rows with it (and add sweeps of other names to its storage), the progress test reads its
    stderr line by line."""
    return run_tiny_tune(tmp_path_factory.mktemp("tiny-tune"), ray_mini_root, ray_backbone, ray_cluster.address)


CLI_SWEEP = "cli"


@pytest.fixture(scope="session")
def cli_sweep(ray_cluster, ray_mini_root, ray_backbone, tmp_path_factory) -> Path:
    """The storage of one tiny sweep through `spt-ray tune` in this process: 2 SPT trials on count, then one final
    seed of the selected config and of the linear and LoRA baselines. test_cli reads it locally, test_remote_storage
    through an S3 bucket holding a copy."""
    from spt_ray.cli import main

    storage = tmp_path_factory.mktemp("cli-sweep")
    code = main(["tune", "--suite", "mini", "--tasks", "count", "--data-root", ray_mini_root, "--storage",
                 str(storage), "--name", CLI_SWEEP, "--num-samples", "2", "--epochs", "2", "--final-seeds", "42",
                 "--baselines", "linear,lora", "--max-concurrent", "2",
                 *(["--weights", ray_backbone.weights] if ray_backbone.weights else [])])
    assert code == 0
    return storage


@pytest.fixture(scope="session")
def searched_sweep(ray_cluster, ray_mini_root, ray_backbone, tmp_path_factory) -> SearchedSweep:
    """tests/searched_sweep.py's search-only sweep (trackers, a callback object, Optuna journal), run in this
    process: test_search_studies and test_trackers read it."""
    from tests.searched_sweep import run_searched_sweep

    return run_searched_sweep(tmp_path_factory.mktemp("searched"), ray_mini_root, ray_backbone)
