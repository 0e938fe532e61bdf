"""Shared fixtures. Environment for Ray and progress bars is set before anything imports them."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPT_NO_PROGRESS", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

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
