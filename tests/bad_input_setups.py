"""Setups of the bad-input campaign (tests/test_bad_input.py): where a case runs, one table row, and the
functions that each break one thing under the case's own folder."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import tiny_vit
from tests.test_cluster import CLOUD, CLOUD_DEFECTS, _load, _write

TASK = "shapes"

@dataclass(frozen=True)
class Env:
    """Where a case runs: its own folder (`tmp`, inputs it breaks), `out` (the output / storage folder that
    must stay empty), and the module's shared, read-only inputs."""

    tmp: Path
    out: Path
    data: Path
    sens: Path
    delta: Path
    results: Path

    def fill(self, text: str) -> str:
        return text.format(tmp=self.tmp, out=self.out, data=self.data, sens=self.sens, delta=self.delta,
                           results=self.results, cloud=CLOUD)


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    expect: tuple[str, ...]  # substrings of the one stderr line: the problem and its fix
    setup: Callable[[Env], None] | None = None


def case(name: str, argv: str, *expect: str, setup: Callable[[Env], None] | None = None) -> Any:
    """One table row."""
    return pytest.param(Case(tuple(shlex.split(argv)), expect, setup), id=name)


# ---- setups: each breaks one thing under env.tmp ----------------------------------------------------
def _data_copy(env: Env) -> Path:
    shutil.copytree(env.data / TASK, env.tmp / "data" / TASK)
    return env.tmp / "data" / TASK


def edit_list(edit: Callable[[list[str]], list[str]]) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        path = _data_copy(env) / "train800.txt"
        lines = edit(path.read_text().splitlines())
        path.write_text("".join(f"{line}\n" for line in lines))
    return setup


def truncate_first_image(env: Env) -> None:
    task = _data_copy(env)
    image = task / (task / "train800.txt").read_text().split()[0]
    image.write_bytes(image.read_bytes()[:40])


def write_file(name: str, content: bytes | str) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        path = env.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


class _Payload:
    """Unpickling this runs a command: a checkpoint must never be unpickled with arbitrary code."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def malicious_pickle(env: Env) -> None:
    torch.save({"state_dict": _Payload(env.out / "pwned")}, env.tmp / "evil.pth")


def wrong_shapes(env: Env) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_vit().state_dict().items()}, str(env.tmp / "tiny.safetensors"))


def kernel_2d(env: Env) -> None:
    from spt_core.backbones_npz import save_npz
    from spt_core.embedded import build_embedded_vit

    save_npz(build_embedded_vit(10), env.tmp / "vit.npz")
    arrays = dict(np.load(env.tmp / "vit.npz"))
    kernel = arrays["embedding/kernel"]
    arrays["embedding/kernel"] = kernel.reshape(-1, kernel.shape[-1])  # HWIO flattened to 2-D
    with open(env.tmp / "vit2d.npz", "wb") as fh:
        np.savez(fh, **arrays)


def other_backbone(env: Env) -> None:
    from safetensors.torch import save_file
    from spt_core.embedded import build_embedded_vit

    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in build_embedded_vit(10).state_dict().items()},
              str(env.tmp / "other.safetensors"))


def yaml_config(text: str) -> Callable[[Env], None]:
    return write_file("sweep.yaml", text)


def read_only(env: Env) -> None:
    """`env.out` as a folder this process cannot write to, also as root (chmod alone does not stop root)."""
    env.out.mkdir(exist_ok=True)
    env.out.chmod(0o555)
    if os.access(env.out, os.W_OK):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            subprocess.run(["chattr", "+i", str(env.out)], check=True, capture_output=True)
    if os.access(env.out, os.W_OK):
        pytest.skip("cannot make a read-only folder here (root without chattr)")


def delta_copy(edit: Callable[[Path], None]) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        shutil.copytree(env.delta, env.tmp / "delta")
        edit(env.tmp / "delta")
    return setup


def flip_value(delta: Path) -> None:
    """Change one byte of the last tensor's data (the end of the file): the file still loads."""
    path = delta / "delta.safetensors"
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x40
    path.write_bytes(bytes(data))


def corrupt_header(delta: Path) -> None:
    path = delta / "delta.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{not json" + data[17:])


def drop_checksum(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    """A delta exported before checksums existed: the damage must still be one line."""
    def apply(delta: Path) -> None:
        meta = json.loads((delta / "meta.json").read_text())
        meta.pop("delta_sha256")
        (delta / "meta.json").write_text(json.dumps(meta))
        edit(delta)
    return apply


def cluster_defect(defect: str) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        config = _load(CLOUD)
        CLOUD_DEFECTS[defect][0](config)
        _write(env.tmp, config)
    return setup
