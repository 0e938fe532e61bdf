"""bench/run.py runs end to end and writes valid JSON with every field (plumbing only: timing belongs in the
benchmark, not here). The tiny mode swaps ViT-B/16 for a tiny ViT so this takes well under a minute."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spt_core.modules import native

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("sparse_layer_vs_dense_bf16_p001", "sparse_layer_vs_dense_bf16_p01", "lora_vs_peft_step_time",
          "spt_vs_lora_step_time", "spt_vs_full_peak_mem_b64", "quick_run_s", "sensitivity_vs_step",
          "spt_vs_lora_peak_mem", "sparse_grad_vs_dense", "ranking_bytes_fraction", "sweep_overhead_fraction",
          "results_query_s")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPT_BENCH_TINY": "1", "HF_HUB_OFFLINE": "1", "SPT_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bench_quick_tiny_writes_every_field_and_keeps_other_keys(tmp_path):
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"store": {"owner": "another benchmark"}, "sparse_grad_vs_dense": "stale"}))
    proc = _bench("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["store"] == {"owner": "another benchmark"}  # read-modify-write: other objects stay
    assert results["settings"]["mode"] == "tiny"
    for field in FIELDS:
        assert field in results, field
        value = results[field]
        if value is None:
            assert results["reasons"].get(field), f"{field} is null without a reason"
        elif field == "sparse_grad_vs_dense":
            assert set(value) == {"0.1%", "1%"} and all(_number(v) for v in value.values())
        else:
            assert _number(value), (field, value)
    assert results["lora_vs_peft_step_time"] is not None or "peft" in results["reasons"]["lora_vs_peft_step_time"]
    layer = results["raw"]["sparse_layer"]
    fast = "native" if native.kernel() is not None else "sddmm"
    assert all(layer[k]["kernel"] == fast for k in ("0.1%", "1%"))  # bf16 fast path, spread entries
    assert layer["1%_concentrated"]["kernel"] == fast and layer["1%_concentrated"]["col_fraction"] == 0.05
    assert all(x["gemm_over_sddmm"] > 0 for x in results["raw"]["path_costs"]["shapes"])
    for key in ("machine", "date", "command", "versions"):
        assert results[key], key
    assert results["command"].startswith("python bench/run.py --quick")
    for key in ("torch", "timm", "python"):
        assert results["versions"][key], key
    for key in ("device_name", "cpu_count", "torch_threads", "date_utc", "git_commit", "load_avg_start"):
        assert key in results["environment"], key
    assert results["cost_model"]["rows"], results["cost_model"]
    assert "| sparse_layer_vs_dense_bf16_p001" in proc.stdout  # the printed table
    assert str(ROOT) not in out.read_text()  # no path of the measuring machine in the results
    table = _bench("--readme-table", "--out", str(out))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("| figure |") and all(any(f"`{f}`" in line for line in lines) for f in FIELDS)


def test_gpu_mode_without_cuda_is_refused_in_one_line(tmp_path):
    proc = _bench("--gpu", "--device", "cpu", "--out", str(tmp_path / "r.json"))
    assert proc.returncode != 0 and not (tmp_path / "r.json").exists()
    assert "--gpu needs a CUDA device" in proc.stderr and "Traceback" not in proc.stderr


def test_ablation_shuffled_map_keeps_scores_and_moves_them():
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from ablation import shuffled

    from spt_core.layout import ModelLayout
    from spt_core.sensitivity import SensitivityMap
    from tests.conftest import tiny_vit

    model = tiny_vit()
    layout, params = ModelLayout.from_model(model), dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    smap = SensitivityMap({p: torch.rand(params[p].shape, generator=g) for p in layout.scored_params}, layout)
    mixed = shuffled(smap, seed=1)
    assert list(mixed) == list(smap) and all(mixed[n].shape == smap[n].shape for n in smap)
    before = torch.cat([smap[n].flatten() for n in smap])
    after = torch.cat([mixed[n].flatten() for n in smap])
    assert torch.equal(before.sort().values, after.sort().values)
    assert (before != after).float().mean() > 0.99


def test_memory_projection_adds_the_per_image_bytes_to_the_measured_peak():
    sys.path.insert(0, str(ROOT / "bench"))
    from figures.memory import project

    mib = 2**20
    runs = {"full": {2: {"peak_bytes": 1500 * mib, "grad_checkpointing": True,
                         "checkpointed_bytes_per_image": 20 * mib, "saved_bytes_per_image": 100 * mib}},
            "spt": {2: {"peak_bytes": 400 * mib, "grad_checkpointing": True,
                        "checkpointed_bytes_per_image": 18 * mib, "saved_bytes_per_image": 90 * mib}},
            "lora": {2: {"error": "killed"}}}
    out = project(runs, (2,))
    assert out["fit"]["full"]["at_64_mib"] == 1500 + 62 * 20 and out["fit"]["spt"]["at_64_mib"] == 400 + 62 * 18
    assert math.isclose(out["spt_vs_full_at_64"], (400 + 62 * 18) / (1500 + 62 * 20))
    assert math.isclose(out["spt_vs_full_measured"], 400 / 1500)
    assert "lora" not in out["fit"] and "spt_vs_lora_at_64" not in out  # a failed run gives no figure
    at_64 = project({"spt": {64: {"peak_bytes": 3 * mib}}, "full": {64: {"peak_bytes": 6 * mib}}}, (64,))
    assert at_64["spt_vs_full_at_64"] == 0.5  # measured at 64 (GPU): no projection


@pytest.mark.parametrize("config", ["spt", "full", "lora"])
def test_skipping_the_products_allocates_the_same_tensors_as_computing_them(config):
    """The CPU memory figure skips the arithmetic (SkipProducts): two training steps under bf16 autocast with
    checkpointing must produce every op's output with the same shape, dtype and strides, in the same order, as
    when computed; only the products' values differ (zeros)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from figures.common import ModelSpec, Runner, build_plans, make_batches
    from figures.memory import _PRODUCTS, SkipProducts

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.outputs, self.product_sums = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
            self.outputs.append((str(func), [(tuple(t.shape), t.dtype, t.layout,
                                              t.stride() if t.layout == torch.strided else None) for t in tensors]))
            if func in _PRODUCTS:
                self.product_sums.append(sum(float(t.detach().abs().sum()) for t in tensors))
            return out

    spec = ModelSpec(tiny=True)
    plan = build_plans(spec, (config,))[0][config]
    x, y = make_batches(spec, 4, 1, "cpu")[0]
    records = []
    for skip in (False, True):
        runner = Runner(spec, plan, "cpu", amp=True, grad_checkpointing=True)
        with SkipProducts() if skip else contextlib.nullcontext(), Record() as record:
            runner.step(x, y)
            runner.step(x, y)
        records.append(record)
    computed, skipped = records
    assert computed.outputs == skipped.outputs
    nonzero = sum(s > 0 for s in computed.product_sums)  # LoRA's zero-initialised up matrix gives some zeros
    assert len(computed.product_sums) > 10 and nonzero > len(computed.product_sums) / 2
    assert all(s == 0 for s in skipped.product_sums)
