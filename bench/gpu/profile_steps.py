"""Where a training step's time goes, per configuration: `torch.profiler` over a few steps after warm-up, the
ops sorted by their device time, plus the kernel and op counts (launch overhead is what a short GPU step
pays for each). ViT-B/16 at batch 64 under bf16 autocast on CUDA; on a CPU (for trying it) a tiny ViT, fp32.

    python bench/gpu/profile_steps.py [--configs lora spt] [--steps 2] [--rows 25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from figures.common import ModelSpec, Runner, build_plans, make_batches, ops_per_call  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["lora", "spt"], choices=("full", "lora", "spt", "spt_adapter"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, spec = ("cuda", ModelSpec()) if cuda else ("cpu", ModelSpec(tiny=True))
    plans, info = build_plans(spec, tuple(args.configs))
    x, y = make_batches(spec, 64 if cuda else 4, 1, device)[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for name in args.configs:
        runner = Runner(spec, plans[name], device, amp=cuda)
        for _ in range(3):
            runner.step(x, y)
        ops = ops_per_call(lambda: runner.step(x, y))
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                runner.step(x, y)
        events = prof.key_averages()
        kernels = sum(e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
        print(f"== {name}: {info[name]['plan']}; {spec.name}, batch {x.shape[0]}, {args.steps} steps; "
              f"aten ops that compute per step {ops}; device kernels per step {kernels / args.steps:.0f}")
        print(events.table(sort_by=sort, row_limit=args.rows))
        del runner


if __name__ == "__main__":
    main()
