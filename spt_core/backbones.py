"""Backbones: build a timm model (or the embedded ``spt-mini-vit``), load local weights, fresh head.

Weights are read from local files only (Google ``.npz``, ``.pth``/``.pt``/``.bin``, ``.safetensors``);
nothing reaches a model hub. The checkpoint's classifier is always discarded and a fresh head for
``num_classes`` is initialised trunc-normal (std 0.02) with zero bias. ``pos_embed`` is resampled when
the image size differs. Every problem with a checkpoint raises a one-line ``BackboneError``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib  # noqa: E402
import threading  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from .backbones_npz import npz_to_state_dict  # noqa: E402
from .embedded import EMBEDDED_NAME, EMBEDDED_WEIGHTS, build_embedded_vit, file_sha256  # noqa: E402

RANDOM = "random"  # weights=RANDOM: random initialisation even where the name has default weights


class BackboneError(ValueError):
    """A backbone that cannot be built or a checkpoint that cannot be used; one line naming the file."""


@dataclass(frozen=True)
class BackboneInfo:
    """Provenance of a built backbone. ``weights_sha256`` is the sha256 of the weights file, or, for a
    random initialisation (``weights`` None), the sha256 of the generated trunk state (head excluded)."""

    name: str
    weights: str | None
    weights_sha256: str
    num_classes: int
    img_size: int
    num_params: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# name -> (builder(num_classes, img_size, drop_path_rate, **kwargs), default weights file)
EMBEDDED_BACKBONES: dict[str, tuple[Callable[..., nn.Module], Path]] = {
    EMBEDDED_NAME: (build_embedded_vit, EMBEDDED_WEIGHTS),
}


def _short(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f", +{len(items) - n} more" if len(items) > n else "")


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


_HASHES: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file (cached by path, size and modification time)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and fp32-contiguous bytes of a state dict."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise BackboneError(f"checkpoint {path} holds no state dict (found {type(obj).__name__}); "
                            "fix: save model.state_dict(), optionally under 'state_dict' or 'model'")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise BackboneError(f"checkpoint {path} has non-tensor entries ({_short(bad)}); "
                            "fix: save model.state_dict(), optionally under 'state_dict' or 'model'")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local checkpoint into a timm-named state dict (the head, if any, still included)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"checkpoint {path} not found; fix: pass the path of a local weights file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        elif suffix == ".safetensors":
            from safetensors.torch import load_file
            return _unwrap(load_file(str(path), device="cpu"), path)
        elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
            return _unwrap(torch.load(path, weights_only=True, map_location="cpu"), path)
        else:
            raise BackboneError(f"checkpoint {path} has unsupported format {suffix or '(none)'}; "
                                "fix: use .npz (Google ViT), .pth/.pt, or .safetensors")
    except BackboneError:
        raise
    except Exception as err:  # corrupt, truncated, wrong format, unsafe pickle: all one-line errors
        raise BackboneError(f"cannot read checkpoint {path} ({_reason(err)}); "
                            "fix: re-download or re-export the file") from None
    state, missing, unused = npz_to_state_dict(arrays)
    if missing:
        raise BackboneError(f"checkpoint {path} is not a Google ViT .npz: {len(missing)} keys missing "
                            f"({_short(missing)}); fix: use an original ViT .npz or convert it to .pth")
    if unused:
        raise BackboneError(f"checkpoint {path} has {len(unused)} keys not used by a ViT ({_short(unused)}); "
                            "fix: use an original ViT .npz")
    return {k: torch.as_tensor(v) for k, v in state.items()}


def _classifier_prefix(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("classifier", "head"))


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """Drop the checkpoint's classifier, resample ``pos_embed`` to the model's grid, and check that the
    rest matches the model exactly (names and shapes); BackboneError otherwise."""
    head = _classifier_prefix(model)
    discard = (head + ".", "pre_logits.")
    state = {k: v for k, v in state.items() if not k.startswith(discard)}
    target = {k: v for k, v in model.state_dict().items() if not k.startswith(discard)}
    old, new = state.get("pos_embed"), target.get("pos_embed")
    if old is not None and new is not None and old.ndim == new.ndim == 3 and old.shape[2] == new.shape[2] \
            and old.shape[1] != new.shape[1]:
        from timm.layers import resample_abs_pos_embed
        prefix_tokens = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = int(round((old.shape[1] - prefix_tokens) ** 0.5))
        if grid * grid != old.shape[1] - prefix_tokens:
            raise BackboneError(f"checkpoint {path}: pos_embed {tuple(old.shape)} is not a square grid after "
                                f"{prefix_tokens} prefix tokens; fix: use weights made for this architecture")
        state["pos_embed"] = resample_abs_pos_embed(old.float(), new_size=list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix_tokens, verbose=False)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
             for k in sorted(set(state) & set(target)) if state[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing ({_short(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_short(unexpected)})" if unexpected else "",
                 f"{len(wrong)} shape mismatches ({_short(wrong, 2)})" if wrong else ""]
        raise BackboneError(f"checkpoint {path} does not fit the model: {'; '.join(p for p in parts if p)}; "
                            "fix: use weights of this architecture (same depth, width and patch size)")
    return state


def reset_head(model: nn.Module) -> None:
    """Fresh classifier: trunc-normal(std 0.02) weight, zero bias (never zero weights)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=0.02)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


_SEEDED = threading.Lock()  # torch's CPU generator is one per process: seeded builds take turns


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """The global torch RNG seeded for the block and restored after it. Threads building seeded backbones at
    once (the sensitivity store hashes random-weight backbones in worker threads) would otherwise draw from
    each other's seeded stream: every build then differed."""
    if seed is None:
        yield
        return
    with _SEEDED, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build(name: str, num_classes: int, img_size: int | None, drop_path_rate: float,
           timm_kwargs: dict[str, Any]) -> nn.Module:
    if name in EMBEDDED_BACKBONES:
        return EMBEDDED_BACKBONES[name][0](num_classes, img_size=img_size, drop_path_rate=drop_path_rate,
                                           **timm_kwargs)
    kwargs = dict(timm_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate,
                                 **kwargs)
    except RuntimeError as err:
        raise BackboneError(f"cannot build backbone {name!r} ({_reason(err)}); fix: use "
                            f"{EMBEDDED_NAME!r} or a timm model name (timm.list_models())") from None


def default_weights(name: str) -> Path | None:
    """The weights a name loads when ``weights`` is None (the shipped file for embedded backbones)."""
    return EMBEDDED_BACKBONES[name][1] if name in EMBEDDED_BACKBONES else None


def create_backbone(name: str, *, weights: str | Path | None = None, num_classes: int,
                    img_size: int | None = None, drop_path_rate: float = 0.1, seed: int | None = None,
                    **timm_kwargs: Any) -> tuple[nn.Module, BackboneInfo]:
    """Build ``name`` (``"spt-mini-vit"`` or any timm model) with a fresh ``num_classes`` head.

    ``weights``: a local file (.npz, .pth/.pt, .safetensors); None = the name's default (the shipped
    file for ``spt-mini-vit``, random init for timm names); ``"random"`` = random init. ``seed`` fixes the
    random init and the head (it uses a forked RNG, leaving the global one untouched); None draws from
    the global torch RNG.
    """
    if weights == RANDOM:
        path = None
    else:
        path = Path(weights) if weights is not None else default_weights(name)
        if path is not None and not path.is_file():
            hint = (f"run spt_core.embedded.pretrain_embedded({str(path)!r})" if weights is None
                    else "pass the path of a local weights file")
            raise BackboneError(f"checkpoint {path} not found; fix: {hint}")
    with _seeded(seed):
        model = _build(name, num_classes, img_size, drop_path_rate, timm_kwargs)
        if path is not None:
            state = fit_state_dict(model, read_checkpoint(path), path)
            model.load_state_dict(state, strict=False)
            digest = weights_sha256(path)
        else:
            head = _classifier_prefix(model) + "."
            digest = state_sha256({k: v for k, v in model.state_dict().items() if not k.startswith(head)})
        reset_head(model)
    patch = getattr(model, "patch_embed", None)
    size = int(patch.img_size[0]) if patch is not None and getattr(patch, "img_size", None) else int(img_size or 0)
    info = BackboneInfo(name=name, weights=str(path) if path is not None else None, weights_sha256=digest,
                        num_classes=num_classes, img_size=size,
                        num_params=sum(p.numel() for p in model.parameters()))
    return model, info
