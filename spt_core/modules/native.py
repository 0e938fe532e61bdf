"""The compiled CPU kernel for the sparse delta's entry gradients (kernels/sddmm.c), built on first use.

torch's CPU sampled matmul takes both operands token-contiguous in fp32, so the sparse backward first makes
two transposing, widening copies of grad_out and x; at ViT-B shapes those copies cost more than the K dot
products (0.8 ms each against 0.8 ms for the kernel on a Sapphire Rapids core), and where the dense bf16
product runs on matrix units they alone cost as much as the weight gradient they replace. The C kernel lays
out 64 tokens at a time in a cache-resident tile (AVX-512 16 x 16 register transposes, widening bf16 / fp16
in registers) and takes the dot products from there, fp32 throughout: 3-4x faster than the torch path at
0.1-1% density (`python bench/run.py --quick`, raw.sparse_grad).

It is built with the system C compiler (`$CC`, else `cc`) for this CPU (-march=native) into a cache keyed by
the source, the compiler, its flags and the CPU's feature flags (`$SPT_KERNEL_CACHE`, else
~/.cache/spt-ray/kernels), so a shared home directory over a mixed cluster holds one build per CPU kind.
Without a compiler, without AVX-512 (the portable build is slower than torch's kernel), or with
SPT_NATIVE=0, `kernel()` is None and the sparse layer takes torch's path; nothing else changes.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels") / "sddmm.c"
NATIVE_FLAGS = ("-O3", "-march=native", "-pthread")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    """Where built kernels live: $SPT_KERNEL_CACHE, else $XDG_CACHE_HOME/spt-ray/kernels (~/.cache)."""
    if os.environ.get("SPT_KERNEL_CACHE"):
        return Path(os.environ["SPT_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spt-ray" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build(flags: tuple[str, ...] = NATIVE_FLAGS, directory: Path | None = None) -> Path:
    """Compile kernels/sddmm.c into a shared library (once per source, compiler, flags and CPU); its path.
    Raises RuntimeError with the compiler's message if there is no compiler or the build fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
    directory = directory or cache_dir()
    target = directory / f"spt_sddmm_{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: concurrent workers building the same key each publish a whole file
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def load(path: Path) -> ctypes.CDLL:
    """The built library with its functions' signatures declared."""
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.spt_sddmm.argtypes = [p, i64, p, i64, ctypes.c_int, i64, i64, i64, p, p, ctypes.c_int, p, p]
    lib.spt_sddmm.restype = ctypes.c_int
    lib.spt_sddmm_scratch.argtypes = [i64, i64]
    lib.spt_sddmm_scratch.restype = i64
    lib.spt_sddmm_simd.restype = ctypes.c_int
    return lib


def kernel() -> ctypes.CDLL | None:
    """This machine's vectorised kernel, built and loaded on first call; None where there is none (see the
    module docstring). A failed build is logged once and not retried in this process."""
    if os.environ.get("SPT_NATIVE", "1") == "0":
        return None
    with _lock:
        if "lib" not in _loaded:
            try:
                lib = load(build())
                _loaded["lib"] = lib if lib.spt_sddmm_simd() else None
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                _log.warning("spt-ray: no compiled sparse-gradient kernel (%s); using torch's", exc)
                _loaded["lib"] = None
        return _loaded["lib"]


def supports(grad_out: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the kernel takes these operands: CPU, 2-D, one dtype of fp32 / bf16 / fp16."""
    return (grad_out.device.type == "cpu" and x.device.type == "cpu" and grad_out.dim() == x.dim() == 2
            and grad_out.dtype == x.dtype and grad_out.dtype in DTYPE_CODES)


def sampled_grad_native(lib: ctypes.CDLL, grad_out: torch.Tensor, x: torch.Tensor, pattern: torch.Tensor,
                        threads: int | None = None) -> torch.Tensor:
    """sum over tokens of grad_out[:, r] * x[:, c] at the CSR pattern's K positions (pattern over
    grad_out's columns x x's columns), in fp32. `threads` (default $SPT_NATIVE_THREADS, else 1) split the
    tokens, each range summing into its own row of a threads x K buffer. One is the default because torch's
    OpenMP workers spin-wait on every core for a while after each op, and threads of ours fight them: inside a
    bf16 layer on 2 cores the sparse/dense ratio was 0.78 with one thread, 0.87 with two."""
    g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    crow, col = pattern.crow_indices().contiguous(), pattern.col_indices().contiguous()
    threads = threads or int(os.environ.get("SPT_NATIVE_THREADS", "1"))
    out = torch.empty(threads, col.numel(), dtype=torch.float32)
    scratch = torch.empty(threads * lib.spt_sddmm_scratch(g.shape[1], x.shape[1]), dtype=torch.float32)
    used = lib.spt_sddmm(g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0), DTYPE_CODES[g.dtype], g.shape[0],
                  g.shape[1], x.shape[1], crow.data_ptr(), col.data_ptr(), threads, out.data_ptr(),
                  scratch.data_ptr())
    return out[0] if used == 1 else out[:used].sum(0)
