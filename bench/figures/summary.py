"""Targets, the printed table, the README table and the notes of a bench run, all from its results dict
(so the README's figures are exactly what bench/results.json holds)."""

from __future__ import annotations

from typing import Any

from .common import median

# figure -> (comparison, target, what it is); the order is the table's.
TARGETS: dict[str, tuple[str, float, str]] = {
    "sparse_layer_vs_dense_bf16_p001": ("<=", 0.8, "sparse-delta layer fwd+bwd / trainable Linear, bf16 autocast, "
                                                   "0.1% density"),
    "sparse_layer_vs_dense_bf16_p01": ("<=", 0.8, "the same at 1% density"),
    "lora_vs_peft_step_time": ("<=", 1.0, "uniform LoRA step / HF PEFT LoRA step, equal parameters"),
    "spt_vs_lora_step_time": ("<=", 1.15, "SPT-LoRA step / uniform LoRA step, equal budget"),
    "spt_vs_full_peak_mem_b64": ("<=", 0.60, "SPT / full fine-tuning peak memory at batch 64, bf16 autocast, grad "
                                            "checkpointing"),
    "spt_vs_lora_peak_mem": ("<=", 1.10, "SPT / uniform LoRA peak memory, the same settings"),
    "sensitivity_vs_step": ("<=", 1.1, "sensitivity pass / full fine-tuning fwd+bwd, same batches"),
    "sparse_grad_vs_dense": ("<", 0.5, "SDDMM entry gradients / dense masked weight gradient (fp32, at 0.1%)"),
    "ranking_bytes_fraction": ("<=", 0.05, "object-store bytes per trial / full fp32 map"),
    "sweep_overhead_fraction": ("<=", 0.10, "smoke sweep wall time outside training and evaluation"),
    "results_query_s": ("<", 1.0, "DuckDB GROUP BY over 1M result rows, seconds"),
    "quick_run_s": ("<=", 600, "wall seconds of `python bench/run.py --quick`"),
}
FIELDS = tuple(TARGETS)


def met(field: str, value: Any) -> bool | None:
    if value is None:
        return None
    op, target, _ = TARGETS[field]
    v = value["0.1%"] if isinstance(value, dict) else value
    return bool(v <= target if op == "<=" else v < target)


def _text(field: str, v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {x:.3f}" for k, x in v.items())
    if field == "quick_run_s":
        return f"{v:.0f} s"
    return f"{v:.3f} s" if field == "results_query_s" else f"{v:.3f}"


def format_table(results: dict[str, Any]) -> str:
    """The run's figures as an aligned text table, with the machine line and the reasons for nulls."""
    rows = [("figure", "value", "target", "met")]
    for f in FIELDS:
        m = met(f, results.get(f))
        rows.append((f, _text(f, results.get(f)), results["targets"][f], "-" if m is None else ("yes" if m else "NO")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append(machine_line(results))
    for f, why in results["reasons"].items():
        lines.append(f"  {f}: null - {why}")
    return "\n".join(lines)


def machine_line(results: dict[str, Any]) -> str:
    env, st = results["environment"], results["settings"]
    return (f"{results['machine']}, {env['torch_threads']} torch threads, load average "
            f"{env['load_avg_start'][0]:.1f} -> {env['load_avg_end'][0]:.1f} (CPU time of the run "
            f"{env.get('run_cpu_s', float('nan')):.0f} s); torch {env['torch']}, timm "
            f"{env['timm']}, peft {env.get('peft')}; {st['mode']} mode: {st['model']} at {st['img_size']} px, "
            f"step batch {st['batch']}; commit {str(env.get('git_commit'))[:10]}, {results['date']}; "
            f"`{results['command']}`")


def readme_table(results: dict[str, Any]) -> str:
    """The README's benchmark table (markdown), generated from bench/results.json."""
    lines = ["| figure | what | value | target | met |", "|---|---|---|---|---|"]
    for f in FIELDS:
        op, target, what = TARGETS[f]
        m = met(f, results.get(f))
        lines.append(f"| `{f}` | {what} | {_text(f, results.get(f))} | {op} {target:g} | "
                     f"{'-' if m is None else ('yes' if m else 'no')} |")
    lines.append("")
    lines.append(machine_line(results) + ".")
    for f, why in (results.get("reasons") or {}).items():
        lines.append(f"- `{f}` null: {why}")
    lines.extend(f"- {n}" for n in (notes(results["raw"], results["settings"]) if results.get("raw") else
                                    results.get("notes") or []))  # from the raw figures: notes read as they do now
    return "\n".join(lines)


def notes(raw: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """Context for reading the figures, with numbers from this run."""
    n: list[str] = []
    st = raw.get("steps") or {}
    if st.get("step_s_median"):
        n.append("median step: " + ", ".join(f"{k} {v:.3f} s" for k, v in st["step_s_median"].items())
                 + f" at batch {st['batch']} ({st['rounds']} interleaved rounds)")
    if st.get("ops_per_step"):
        n.append("aten ops that compute, per training step here (each one or more kernel launches on a GPU; AdamW "
                 "is the fused kernel, as the Trainer's): " +
                 ", ".join(f"{k} {v}" for k, v in st["ops_per_step"].items()))
    for clock, key in (("wall", "spt_vs_lora_per_round"), ("CPU", "spt_vs_lora_cpu_per_round")):
        rounds = st.get(key) or []
        if rounds:
            n.append(f"SPT/LoRA step by {clock} time per round: {min(rounds):.3f}..{max(rounds):.3f} "
                     f"(median {median(rounds):.3f})")
    lp = raw.get("lora_peft") or {}
    if lp.get("ratio_per_round"):
        cpu = lp.get("cpu_time_ratio_per_round") or [float("nan")]
        n.append(f"LoRA vs PEFT on {lp['arch']} at batch {lp['batch']}, rank {lp['rank']} ({lp['trainable_params']}"
                 f" trainable): wall time per round {min(lp['ratio_per_round']):.3f}..{max(lp['ratio_per_round']):.3f}"
                 f" (median {lp['ratio']:.3f}), CPU time per round {min(cpu):.3f}..{max(cpu):.3f}"
                 + (f"; aten ops per step {lp['ops_per_step']}" if lp.get("ops_per_step") else ""))
    sl = raw.get("sparse_layer") or {}
    for key, case in sl.items():
        if isinstance(case, dict):
            where = (f" (entries within {case['col_fraction']:.0%} of the input columns, the backward keeping "
                     "only those)" if case.get("col_fraction") else "")
            n.append(f"sparse layer at {key}{where}: K={case['k']}, entry gradients by the {case['kernel']} kernel, "
                     f"per round {min(case['ratio_per_round']):.3f}..{max(case['ratio_per_round']):.3f}, "
                     f"median by wall time {case['ratio']:.3f}, by this process's CPU time "
                     f"{case['cpu_time_ratio']:.3f}")
    pc = raw.get("path_costs") or {}
    if pc.get("shapes"):
        for path, label in (("gemm", "dense product"), ("native", "compiled kernel")):
            by_width = {}
            for x in pc["shapes"]:
                if f"{path}_over_sddmm" in x:
                    by_width.setdefault("<= 48" if x["n_in"] <= 48 else ">= 192", []).append(x[f"{path}_over_sddmm"])
            if by_width:
                n.append(f"entry gradients, {label} / torch's SDDMM on a CPU over {len(pc['shapes'])} shapes "
                         f"({pc['tokens']} tokens; d_out 768 / 3072, fill 0.2-20%), by kept input columns: " + ", ".join(
                             f"{w}: {min(v):.2f}..{max(v):.2f} (median {median(v):.2f})" for w, v in by_width.items()))
    mem = raw.get("memory") or {}
    fit = mem.get("fit") or {}
    if fit:
        how = "torch.cuda.max_memory_allocated" if settings.get("device") == "cuda" else "live-tensor RSS"
        how += ", bf16 autocast" if settings.get("mem_amp", settings.get("amp")) else ", fp32"
        n.append(f"peak memory ({how}, grad checkpointing " + ("on" if mem.get("grad_checkpointing")
                 else "off") + f", batches {mem.get('batches')}): " + ", ".join(
                     f"{k} {v['peak_mib']:.0f} MiB at batch {v['measured_batch']}"
                     + (f" + {v['per_image_mib']:.1f}/image -> {v['at_64_mib']:.0f} at 64"
                        if v.get("per_image_mib") is not None and v["measured_batch"] != 64 else "")
                     for k, v in fit.items()))
    wo = mem.get("without_checkpointing") or {}
    if wo.get("spt_vs_full_at_64"):
        n.append(f"without checkpointing (saved-tensor bytes per image + fixed): SPT/full at batch 64 "
                 f"{wo['spt_vs_full_at_64']:.2f}")
    if settings["mode"] == "tiny":
        n.append("tiny mode: plumbing check only, the figures are not representative")
    return n
