"""The compiled sparse-gradient kernel (spt_core/modules/kernels/sddmm.c): its builds (this CPU's and the
portable one) against an fp64 brute force over the shapes that exercise every tail, the build cache, and the
fallback when there is no compiler."""

from __future__ import annotations

import logging
import platform
import shutil
import threading
from pathlib import Path

import pytest
import torch

from spt_core.modules import native
from spt_core.modules.sparse import PATH_COUNTS, csr_pattern, sampled_grad

needs_cc = pytest.mark.skipif(not shutil.which("cc") and not shutil.which("gcc"), reason="no C compiler")
PORTABLE = ("-O2", "-pthread")  # no -march: x86-64 baseline, the plain C loops


@pytest.fixture(scope="module", params=["native", "portable"])
def lib(request, tmp_path_factory):
    if not shutil.which("cc") and not shutil.which("gcc"):
        pytest.skip("no C compiler")
    flags = native.NATIVE_FLAGS if request.param == "native" else PORTABLE
    return native.load(native.build(flags, tmp_path_factory.mktemp(request.param)))


def _case(tokens, d_out, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(tokens, d_out, generator=g).to(dtype)
    x = torch.randn(tokens, n, generator=g).to(dtype)
    flat = torch.sort(torch.randperm(d_out * n, generator=g)[:k]).values
    rows, cols = flat // n, flat % n
    brute = (grad.double()[:, rows] * x.double()[:, cols]).sum(0)
    return grad, x, rows, cols, csr_pattern(rows, cols, (d_out, n)), brute


# (tokens, d_out, n, K): full tiles and 16-wide blocks; partial tiles; widths off the 16 grid; one column;
# no tokens; empty rows (K far below d_out).
SHAPES = [(128, 32, 48, 300), (197, 40, 35, 200), (5, 16, 17, 30), (70, 33, 1, 20), (0, 16, 16, 10),
          (64, 256, 64, 12)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_equals_the_brute_force_sum_over_tokens(lib, dtype, shape, threads):
    tokens, d_out, n, k = shape
    grad, x, rows, cols, pattern, brute = _case(tokens, d_out, n, k, dtype)
    got = native.sampled_grad_native(lib, grad, x, pattern, threads=threads)
    assert got.dtype == torch.float32 and got.shape == (k,)
    torch.testing.assert_close(got.double(), brute, rtol=1e-5, atol=1e-4)  # fp32 accumulation of exact products


def test_kernel_reads_strided_rows_and_leaves_its_inputs_alone(lib):
    grad, x, rows, cols, pattern, brute = _case(150, 48, 64, 200, torch.bfloat16)
    wide = torch.zeros(150, 100, dtype=torch.bfloat16)
    wide[:, 10:74] = x  # a column slice: row stride 100, as x[..., a:b] would come in
    before = (grad.clone(), wide.clone(), pattern.crow_indices().clone(), pattern.col_indices().clone())
    got = native.sampled_grad_native(lib, grad, wide[:, 10:74], pattern)
    torch.testing.assert_close(got.double(), brute, rtol=1e-5, atol=1e-4)
    after = (grad, wide, pattern.crow_indices(), pattern.col_indices())
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@needs_cc
def test_this_cpus_build_is_vectorised_exactly_where_it_has_avx512(tmp_path):
    lib = native.load(native.build(native.NATIVE_FLAGS, tmp_path))
    flags = native._cpu_flags().split()
    if platform.machine() in ("x86_64", "AMD64"):
        assert bool(lib.spt_sddmm_simd()) == ("avx512f" in flags)
    assert native.load(native.build(PORTABLE, tmp_path)).spt_sddmm_simd() == 0 or "avx512f" in flags


@needs_cc
def test_the_cache_builds_once_per_key_and_concurrent_builds_publish_one_whole_file(tmp_path):
    paths: list[Path] = []
    workers = [threading.Thread(target=lambda: paths.append(native.build(directory=tmp_path))) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(set(paths)) == 1 and [p.name for p in tmp_path.iterdir()] == [paths[0].name]  # no temp files left
    mtime = paths[0].stat().st_mtime_ns
    assert native.build(directory=tmp_path) == paths[0] and paths[0].stat().st_mtime_ns == mtime
    assert native.build(PORTABLE, tmp_path) != paths[0]  # other flags, other file


def test_no_compiler_means_torchs_kernel_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("SPT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.kernel() is None and native.kernel() is None
    assert len(caplog.records) == 1 and "using torch's" in caplog.records[0].getMessage()
    _, _, rows, cols, pattern, _ = _case(10, 8, 8, 5, torch.bfloat16)
    before = dict(PATH_COUNTS)
    sampled_grad(torch.randn(10, 8).bfloat16(), torch.randn(10, 8).bfloat16(), rows, cols, pattern)
    assert PATH_COUNTS["sddmm"] == before["sddmm"] + 1 and PATH_COUNTS["native"] == before["native"]
    assert list(tmp_path.iterdir()) == []  # the failed build left nothing behind


def test_spt_native_0_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("SPT_NATIVE", "0")
    assert native.kernel() is None
