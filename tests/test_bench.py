"""bench/run.py runs end to end and writes valid JSON with every field (plumbing only: timing belongs in the
benchmark, not here). The tiny mode swaps ViT-B/16 for a tiny ViT so this takes well under a minute."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("sensitivity_vs_step", "spt_vs_lora_step_time", "spt_vs_lora_peak_mem", "spt_vs_full_peak_mem",
          "sparse_grad_vs_dense", "ranking_bytes_fraction", "sweep_overhead_fraction", "results_query_s")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_bench_quick_tiny_writes_every_field(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "SPT_BENCH_TINY": "1", "HF_HUB_OFFLINE": "1", "SPT_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
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
    env_info = results["environment"]
    for key in ("torch", "timm", "device_name", "cpu_count", "torch_threads", "date_utc", "git_commit"):
        assert key in env_info, key
    assert results["cost_model"]["rows"], results["cost_model"]
    assert "| sensitivity_vs_step" in proc.stdout  # the printed table
    assert str(ROOT) not in out.read_text()  # no path of the measuring machine in the results


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
