"""spt-ray benchmark: every figure measured side by side in one run; a table and `bench/results.json`.

    python bench/run.py --quick         # under 10 minutes on 2 CPU cores (ViT-B/16; steps at a small batch)
    python bench/run.py --gpu           # the GPU settings: ViT-B/16, batch 64 at 224 px, bf16; needs CUDA, no Ray
    python bench/run.py --tiny          # plumbing check (tests): a tiny ViT, seconds; also SPT_BENCH_TINY=1
    python bench/run.py --readme-table  # print the README's table from bench/results.json (runs nothing)

Ratios are medians of per-round ratios between configurations measured back to back, in an order that
rotates every round (the machine may be shared and noisy). Peak memory is measured in one fresh subprocess
per configuration and batch. bench/figures/ holds one module per figure; bench/cost_model.py the sweep cost
model. The results file is read, updated and written back: keys other benchmarks own (e.g. `store`) stay.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import figures  # noqa: E402
from cost_model import Workload, cost_table, figures_from_results, format_cost_table  # noqa: E402
from figures import ROOT, ModelSpec  # noqa: E402
from figures.summary import FIELDS, TARGETS, format_table, met, notes, readme_table  # noqa: E402

import torch  # noqa: E402

SPARSE_KEYS = ("0.1%", "1%")
# The LoRA-vs-PEFT backbone off the GPU: ViT-Ti/16 at 224 px (rank 8 on q,v = PEFT rank 8 on qkv = 73,728
# LoRA parameters); its small width makes the LoRA branches a larger share of the step than on ViT-B.
PEFT_ARCH_CPU = dict(arch="vit_tiny_patch16_224", img_size=224, batch=8)


# ---- modes --------------------------------------------------------------------------------------------
def settings(args: argparse.Namespace) -> dict[str, Any]:
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    device = "cuda" if cuda else "cpu"
    if args.gpu and not cuda:
        print("bench/run.py: error: --gpu needs a CUDA device (torch.cuda.is_available() is False or --device "
              "cpu); run --quick on a CPU", file=sys.stderr)
        raise SystemExit(2)
    peft = dict(PEFT_ARCH_CPU, rounds=6, warmup=1)
    if args.tiny:
        s = dict(mode="tiny", batch=4, rounds=2, warmup=1, sens_batches=1, sens_rounds=2, mem_steps=1,
                 mem_batches=(2,), sparse_rounds=2, result_rows=20_000, sweep=False, query=True, calibrate=False,
                 step_configs=("lora", "spt"), peft=dict(peft, batch=2, rounds=2, img_size=32,
                                                          model_kwargs=dict(patch_size=8, depth=2)))
    elif args.quick:
        # Sensitivity over 3 batches a call: its once-per-map setup (zeroed fp32 accumulators, the model's size)
        # spreads as over a real map's ~25 batches, if less; with 1 batch it set the ratio's round-to-round swing.
        s = dict(mode="quick", batch=2, rounds=8, warmup=1, sens_batches=3, sens_rounds=3, mem_steps=2,
                 mem_batches=(64,), sparse_rounds=31, sparse_budget_s=40, result_rows=1_000_000, sweep=False,
                 query=False, calibrate=False, step_configs=("lora", "spt"), peft=dict(peft, rounds=5))
    else:
        s = dict(mode="gpu" if args.gpu else "full", batch=64, rounds=10, warmup=3, sens_batches=4, sens_rounds=4,
                 mem_steps=3, mem_batches=(64,), sparse_rounds=15, result_rows=1_000_000, sweep=not args.gpu,
                 query=True, calibrate=True, step_configs=("lora", "spt", "spt_adapter", "full"),
                 peft=dict(arch="vit_base_patch16_224", img_size=224, batch=64, rounds=10, warmup=3))
    for key in ("batch", "rounds"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if args.sweep is not None:
        s["sweep"] = args.sweep
    # Peak memory under the recipe's bf16 autocast on any device (on a CPU it came within 2% of the H200's
    # figure); step times in bf16 on a GPU only: CPU kernels under bf16 say little about a GPU's.
    # The sparse layer at one batch of the mode's recipe: batch 8 on a CPU, 64 on a GPU (197 tokens an image); at
    # batch 8 a GPU layer's time is mostly the launches and the autograd calls, not the layer's work.
    s.update(sparse_tokens=197 * (64 if s["mode"] == "gpu" else 8), path_rounds=1 if s["mode"] == "tiny" else 3)
    s.setdefault("sparse_budget_s", None)  # seconds a sparse-layer case may take (5 rounds at least)
    s.update(device=device, amp=bool(cuda and not args.no_amp), mem_amp=not args.no_amp,
             threads=torch.get_num_threads(), grad_checkpointing=not args.no_grad_checkpointing)
    return s


def environment(device: str) -> dict[str, Any]:
    import timm

    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "timm": timm.__version__,
        "device_type": device, "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_model": _cpu_info("model name") or platform.processor() or "unknown",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16_flags": _cpu_bf16_flags(),
        "load_avg_start": list(os.getloadavg()),
    }
    # Whether the CPU multiplies bf16 natively decides the bf16 figures' CPU times (without it torch's bf16
    # matmul ran 5-80x its fp32 time here, by operand layout), so the machine line says so.
    bf16 = "native bf16 (" + ", ".join(env["cpu_bf16_flags"]) + ")" if env["cpu_bf16_flags"] else "no native bf16"
    env["device_name"] = (torch.cuda.get_device_name(0) if device == "cuda" else
                          f"CPU: {env['cpu_model']}, {env['cpu_capability']}, {bf16}")
    for mod in ("numpy", "peft", "ray", "duckdb", "pyarrow", "optuna"):  # versions without importing them
        try:
            env[mod] = importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:
            env[mod] = None
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "spt_core", "spt_ray", "bench"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        env["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        env["git_commit"], env["git_dirty"] = None, None
    return env


def _cpu_info(field: str) -> str | None:
    """The first `field` line of /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_bf16_flags() -> list[str]:
    """The CPU's bf16 arithmetic extensions (x86: AVX512-BF16, AMX-BF16, AVX-NE-CONVERT; Arm: bf16)."""
    flags = set((_cpu_info("flags") or _cpu_info("Features") or "").split())
    return sorted(flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert", "bf16"})


def sanitize(obj: Any) -> Any:
    """No path of the measuring machine in the results: repo, temp and home folders become placeholders."""
    subs = [(str(ROOT), "<repo>"), (str(ROOT.parent), "<parent>"), (tempfile.gettempdir(), "<tmp>"),
            (str(Path.home()), "~")]
    if isinstance(obj, str):
        for a, b in subs:
            obj = obj.replace(a, b)
        return obj
    if isinstance(obj, dict):
        return {k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    return obj


# ---- running every figure -----------------------------------------------------------------------------
def run_all(args: argparse.Namespace) -> dict[str, Any]:
    s = settings(args)
    spec = ModelSpec(tiny=s["mode"] == "tiny")
    skip = set(args.skip or [])
    log = (lambda msg: None) if args.silent else (lambda msg: print(msg, flush=True))
    env = environment(s["device"])
    log(f"spt-ray bench, {s['mode']} mode: {spec.name}, batch {s['batch']} at {spec.img_size} px on "
        f"{env['device_name']} ({s['threads']} torch threads){', bf16 autocast' if s['amp'] else ''}")
    raw: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    out: dict[str, Any] = {f: None for f in FIELDS}
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, fn, *fields: str):
        if name in skip:
            for f in fields:
                reasons[f] = f"skipped (--skip {name})"
            return None
        log(f"[{name}]")
        t0 = time.perf_counter()
        try:
            raw[name] = fn()
            return raw[name]
        except Exception as err:  # noqa: BLE001 - one failed figure must not lose the others
            for f in fields:
                reasons[f] = f"{name} failed: {type(err).__name__}: {err}"[:500]
            log(f"  FAILED: {type(err).__name__}: {err}")
            return None
        finally:
            timings[name] = time.perf_counter() - t0

    plans: dict[str, Any] = {}
    # On a CPU the time ratios are taken by this process's CPU time (both sides measured the same way, round by
    # round): wall time on a shared CPU also counts the time other jobs hold the cores. Wall ratios stay in raw.
    cpu_clock = s["device"] == "cpu"

    def build():
        built, info = figures.build_plans(spec, tuple(dict.fromkeys(("full", "lora", "spt") + s["step_configs"])))
        plans.update(built)
        for n, i in info.items():
            log(f"  {n}: {i['plan']}, {i['trainable_params']:,} trainable (head excluded)")
        return info

    stage("plans", build, "spt_vs_lora_step_time", "sensitivity_vs_step")
    if plans:
        timed = {n: plans[n] for n in s["step_configs"]}
        r = stage("steps", lambda: figures.measure_steps(spec, timed, batch=s["batch"], rounds=s["rounds"],
                                                         warmup=s["warmup"], device=s["device"], amp=s["amp"],
                                                         log=log), "spt_vs_lora_step_time")
        if r is not None:
            out["spt_vs_lora_step_time"] = r.get("spt_vs_lora_cpu_time" if cpu_clock else "spt_vs_lora_per_round")
            if not cpu_clock:
                out["spt_vs_lora_step_time"] = figures.median(out["spt_vs_lora_step_time"] or [])
        r = stage("sensitivity", lambda: figures.measure_sensitivity(
            spec, plans["full"], batch=s["batch"], batches=s["sens_batches"], rounds=s["sens_rounds"],
            device=s["device"], log=log), "sensitivity_vs_step")
        if r is not None:
            out["sensitivity_vs_step"] = r["ratio"]

    mem_configs = tuple(dict.fromkeys(("full", "lora", "spt") + s["step_configs"]))
    r = stage("memory", lambda: figures.measure_memory(
        spec, mem_configs, batches=s["mem_batches"], device=s["device"], amp=s["mem_amp"],
        steps=s["mem_steps"], threads=s["threads"], grad_checkpointing=s["grad_checkpointing"], log=log),
        "spt_vs_lora_peak_mem", "spt_vs_full_peak_mem_b64")
    if r is not None:
        for f, key in (("spt_vs_full_peak_mem_b64", "spt_vs_full_at_64"), ("spt_vs_lora_peak_mem", "spt_vs_lora_at_64")):
            out[f] = r.get(key)
            if out[f] is None:
                reasons[f] = "a memory subprocess failed: " + json.dumps(r.get("runs"), default=str)[:400]

    r = stage("sparse_layer", lambda: figures.measure_sparse_layer(rounds=s["sparse_rounds"], device=s["device"],
                                                                   tokens=s["sparse_tokens"],
                                                                   budget_s=s["sparse_budget_s"], log=log),
              "sparse_layer_vs_dense_bf16_p001", "sparse_layer_vs_dense_bf16_p01")
    if r is not None:
        out["sparse_layer_vs_dense_bf16_p001"], out["sparse_layer_vs_dense_bf16_p01"] = (
            r[k]["cpu_time_ratio" if cpu_clock else "ratio"] for k in SPARSE_KEYS)
    r = stage("sparse_grad", lambda: figures.measure_sparse_grad(rounds=s["sparse_rounds"], device=s["device"],
                                                                 log=log), "sparse_grad_vs_dense")
    if r is not None:
        out["sparse_grad_vs_dense"] = {k: r[k]["ratio"] for k in SPARSE_KEYS}
    if s["device"] == "cpu":  # both entry-gradient kernels over layer shapes: why a CPU keeps the SDDMM
        stage("path_costs", lambda: figures.measure_path_costs(rounds=s["path_rounds"], log=log))

    missing_peft = figures.peft_available()
    if missing_peft:
        reasons["lora_vs_peft_step_time"] = missing_peft
        log(f"[lora_peft] skipped: {missing_peft}")
    else:
        r = stage("lora_peft", lambda: figures.measure_lora_vs_peft(
            rank=8, device=s["device"], amp=s["amp"], log=log, **s["peft"]), "lora_vs_peft_step_time")
        if r is not None:
            out["lora_vs_peft_step_time"] = r["cpu_time_ratio" if cpu_clock else "ratio"]

    r = stage("ranking", lambda: figures.measure_ranking_bytes(spec, calibrate=s["calibrate"], log=log),
              "ranking_bytes_fraction")
    if r is not None:
        out["ranking_bytes_fraction"] = r["fraction"]

    if s["sweep"]:
        r = stage("sweep", lambda: figures.measure_sweep_overhead(timeout=args.sweep_timeout, log=log),
                  "sweep_overhead_fraction")
        if r is not None:
            out["sweep_overhead_fraction"] = r.get("share")
            if r.get("share") is None:
                reasons["sweep_overhead_fraction"] = r.get("reason", "no share reported")
    else:
        reasons["sweep_overhead_fraction"] = (f"not measured in {s['mode']} mode (the smoke sweep needs Ray and "
                                              "takes minutes); pass --sweep")
    if s["query"]:
        r = stage("results_query", lambda: figures.measure_results_query(rows=s["result_rows"], log=log),
                  "results_query_s")
        if r is not None:
            out["results_query_s"] = r["s"]
    else:
        reasons["results_query_s"] = (f"not measured in {s['mode']} mode: bench/results_query.py measures the "
                                      "results view (dedup_query_vs_raw)")

    total = time.perf_counter() - started
    cpu = os.times()  # CPU seconds of this run and its subprocesses: what the run costs, whatever the load
    env["run_cpu_s"] = cpu.user + cpu.system + cpu.children_user + cpu.children_system
    if s["mode"] == "quick":
        out["quick_run_s"] = total
    else:
        reasons["quick_run_s"] = f"set by --quick runs only (this was {s['mode']} mode)"
    env["load_avg_end"] = list(os.getloadavg())
    results: dict[str, Any] = dict(out)
    results["machine"] = f"{env['device_name']} ({env['cpu_affinity'] or env['cpu_count']} CPUs)"
    results["date"] = env["date_utc"]
    results["command"] = " ".join(["python", "bench/run.py", *(args.argv or [])])
    results["versions"] = {k: env.get(k) for k in ("python", "torch", "timm", "peft", "numpy", "ray", "duckdb",
                                                    "pyarrow", "optuna")}
    results["targets"] = {f: f"{op} {v:g}" + (" (at 0.1% density)" if f == "sparse_grad_vs_dense" else "")
                          for f, (op, v, _) in TARGETS.items()}
    results["met"] = {f: met(f, out[f]) for f in FIELDS}
    results["reasons"] = {f: reasons.get(f, "null") for f in FIELDS if out[f] is None}
    results["settings"] = {**s, "model": spec.name, "img_size": spec.img_size,
                           "lora_targets": list(figures.LORA_TARGETS),
                           "spt_plan": (raw.get("plans") or {}).get("spt", {}).get("plan"),
                           "time_ratios_by": "process CPU time" if cpu_clock else "wall time"}
    results["notes"] = notes(raw, results["settings"])
    results["environment"] = env
    results["raw"] = raw
    results["stage_s"] = timings
    results["total_s"] = total
    try:
        fig = figures_from_results(results, args.gpu_step_s, args.gpu_eval_s)
        if args.gpu_json and not args.gpu_step_s:
            fig = figures_from_results(json.loads(Path(args.gpu_json).read_text()))
        results["cost_model"] = cost_table(fig, overhead=args.overhead, wl=Workload(baselines=args.baselines))
    except Exception as err:  # noqa: BLE001
        results["cost_model"] = {"error": f"{type(err).__name__}: {err}"}
    return sanitize(results)


def read_existing(path: Path) -> dict[str, Any]:
    """The results file as it is (read before measuring, so a broken file stops the run at once)."""
    if not path.exists():
        return {}
    try:
        existing = json.loads(path.read_text())
    except ValueError as err:
        existing = err
    if not isinstance(existing, dict):
        print(f"bench/run.py: error: {path} is not a JSON object ({existing}); fix or move it (it may hold other "
              "benchmarks' results)", file=sys.stderr)
        raise SystemExit(2)
    return existing


def write_merged(path: Path, results: dict[str, Any]) -> None:
    """Read-modify-write: this run's keys replace their old values; every other top-level key (objects other
    benchmarks write into the same file, e.g. `store`) is kept as it is now (re-read just before writing)."""
    merged = read_existing(path)
    merged.update(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1, default=str) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description="spt-ray benchmark (see the module docstring)")
    ap.add_argument("--quick", action="store_true", help="under 10 minutes on 2 CPU cores")
    ap.add_argument("--gpu", action="store_true", help="GPU settings: ViT-B/16, batch 64 at 224 px, bf16 (needs CUDA)")
    ap.add_argument("--tiny", action="store_true", default=os.environ.get("SPT_BENCH_TINY") == "1",
                    help="a tiny ViT instead of ViT-B/16 (plumbing check; also SPT_BENCH_TINY=1)")
    ap.add_argument("--readme-table", action="store_true", help="print the README table from --out and exit")
    ap.add_argument("--out", help="results file (default bench/results.json; bench/results_gpu.json with --gpu)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--batch", type=int, help="override the mode's batch size")
    ap.add_argument("--rounds", type=int, help="override the mode's interleaved rounds")
    ap.add_argument("--no-amp", action="store_true",
                    help="fp32 (default: bf16 autocast as the VTAB recipe, for the steps on CUDA and the memory figure)")
    ap.add_argument("--no-grad-checkpointing", action="store_true", help="peak memory without checkpointing")
    ap.add_argument("--sweep", dest="sweep", action="store_true", default=None, help="measure the sweep overhead")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--sweep-timeout", type=float, default=900)
    ap.add_argument("--skip", nargs="*", choices=("plans", "steps", "sensitivity", "memory", "sparse_layer",
                                                  "sparse_grad", "path_costs", "lora_peft", "ranking", "sweep",
                                                  "results_query"))
    ap.add_argument("--gpu-step-s", type=float, help="GPU seconds per SPT step at batch 64, for the cost model")
    ap.add_argument("--gpu-eval-s", type=float, help="GPU seconds per forward batch of 64, for the cost model")
    ap.add_argument("--gpu-json", help="a results.json from a GPU run, for the cost model")
    ap.add_argument("--overhead", type=float, default=0.10, help="cost model: share of wall time outside steps")
    ap.add_argument("--baselines", type=int, default=0, help="cost model: fixed baseline runs per task")
    ap.add_argument("--silent", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(args.out or ROOT / "bench" / ("results_gpu.json" if args.gpu else "results.json"))
    if args.readme_table:
        print(readme_table(json.loads(out.read_text())))
        return None
    read_existing(out)
    results = run_all(args)
    write_merged(out, results)
    print()
    print(format_table(results))
    print()
    cm = results.get("cost_model", {})
    print(format_cost_table(cm) if "rows" in cm else f"cost model: {cm.get('error')}")
    print(f"\nwrote {sanitize(str(out.resolve()))} in {results['total_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
