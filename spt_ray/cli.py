"""The `spt-ray` command line. Each subcommand parses flags and calls one library function.

Bad input ends with a one-line `spt-ray: error: ...` on stderr and exit code 2 (SPT_DEBUG=1 shows the
traceback instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

SUITES = ("mini", "vtab", "fgvc")
EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """Bad input detected by the CLI itself."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with the project's error shape: one line naming the problem and where the fix is, exit 2
    (argparse's own prints the whole usage block first, which buries the line that matters)."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _flag_value(text: str, what: str, example: str) -> float:
    """A finite float flag value (argparse's float takes 'nan' and 'inf'); argparse shows the message."""
    from spt_core.checks import finite

    try:
        return finite(text, what)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} {text!r} is not a finite number; give e.g. {example}") from None


def parse_budget(text: str) -> int:
    """`400000`, `400k`, `0.4M` -> 400000."""
    t = text.strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    value = _flag_value(t[:-1] if scale > 1 else t, "budget", "400000, 400k or 0.4M") * scale
    if not 1 <= value < 2 ** 63:  # int(round(inf)) would be an OverflowError traceback
        raise argparse.ArgumentTypeError(f"budget {text!r} is not a parameter count >= 1; give e.g. 400000, "
                                         "400k or 0.4M")
    return int(round(value))


def finite_float(text: str) -> float:
    """A float flag that refuses NaN and infinity (`--alpha inf` would otherwise be accepted)."""
    return _flag_value(text, "value", "10 or 2.5")


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# ---- data / backbone --------------------------------------------------------------------------------
def cmd_data_mini(args: argparse.Namespace) -> int:
    from spt_core.data.mini import write_mini_suite
    from spt_core.data.vtab import task_info

    out = write_mini_suite(args.out, seed=args.seed, tasks=args.tasks)
    print(f"mini suite (seed {args.seed}) in {out}")
    for task in sorted(p.name for p in Path(out).iterdir() if (p / "train800.txt").is_file()):
        info = task_info(task)
        print(f"  {task:<16} {info.group:<12} {info.num_classes:>3} classes")
    return 0


def cmd_data_probe(args: argparse.Namespace) -> int:
    from spt_core.mini_eval import format_table, probe_table

    rows = probe_table(args.out, tasks=args.tasks, methods=args.methods, epochs=args.epochs,
                       backbone=_backbone(args), progress=True)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def cmd_backbone_pretrain(args: argparse.Namespace) -> int:
    from spt_core.embedded import pretrain_embedded

    steps = {} if args.steps is None else {"steps": args.steps}
    result = pretrain_embedded(args.out, seed=args.seed, **steps)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_backbone_info(args: argparse.Namespace) -> int:
    from spt_core.experiment import load_backbone

    _, info = load_backbone(_backbone(args), None, seed=0)
    print(json.dumps(info, indent=2, default=str))
    return 0


# ---- method -----------------------------------------------------------------------------------------
def _task(args: argparse.Namespace):
    from spt_core.experiment import TaskRef

    root = args.data_root
    if root is None:
        if args.suite != "mini":
            raise UsageError(f"--data-root is required for the {args.suite} suite (the folder holding <task>/)")
        from spt_core.data.mini import write_mini_suite

        root = str(write_mini_suite(Path(args.cache_dir) / "mini"))
    if not Path(root).is_dir():
        raise UsageError(f"--data-root {root} is not a folder; point it at the folder holding <task>/")
    return TaskRef(args.suite if args.suite != "mini" else "mini", args.task, str(root), args.img_size)


def _backbone(args: argparse.Namespace):
    from spt_core.experiment import BackboneRef

    if args.weights and not Path(args.weights).is_file():
        raise UsageError(f"--weights {args.weights} does not exist; give a .npz, .pth or .safetensors file")
    return BackboneRef(args.backbone, args.weights)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from spt_core.experiment import compute_task_sensitivity
    from spt_core.sensitivity import check_sensitivity_split

    check_sensitivity_split(args.split, args.suite)  # before any data is generated or read
    smap = compute_task_sensitivity(_task(args), _backbone(args), split=args.split, num_batches=args.num_batches,
                                    batch_size=args.batch_size, seed=args.seed, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.task}-{smap.meta['key']['key']}.safetensors"
    smap.save(path)
    print(f"sensitivity of {args.task}: {smap.num_entries:,} entries over {smap.meta['num_samples']} images "
          f"in {smap.meta['seconds']:.1f}s -> {path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    if args.source == "released":
        from spt_core.released import released_plan

        if args.task is None:
            raise UsageError("--task is required with --source released")
        plan = released_plan(args.task, args.budget, structured=args.structured)
    else:
        from spt_core import SensitivityMap
        from spt_core.experiment import build_plan

        if not args.sensitivity:
            raise UsageError("--sensitivity FILE is required with --source computed (see `spt-ray sensitivity`)")
        if not Path(args.sensitivity).is_file():
            raise UsageError(f"--sensitivity {args.sensitivity} does not exist; compute it with `spt-ray sensitivity`")
        smap = SensitivityMap.load(args.sensitivity)
        plan = build_plan(f"spt-{args.structured}", smap, budget=args.budget, alpha=args.alpha, rank=args.rank,
                          bits=args.bits)
    print(plan.summary())
    if args.out:
        Path(args.out).write_text(plan.to_json(indent=1))
        print(f"plan written to {args.out}")
    return 0


# ---- sweeps and results -----------------------------------------------------------------------------
def cmd_tune(args: argparse.Namespace) -> int:
    from spt_ray.launch import run_from_args

    run_from_args(args)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from spt_ray.artifacts import export_trial, merged_usage

    out = export_trial(args.storage, args.trial_id, args.out, sweep=args.sweep, merged=args.merged)
    size = sum(p.stat().st_size for p in Path(out).iterdir() if not p.name.startswith("merged"))
    print(f"exported trial {args.trial_id} to {out} ({size / 1024:.1f} KiB)")
    if args.merged:
        print(f"merged timm weights: {merged_usage(out)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from spt_ray.artifacts import evaluate_delta

    result = evaluate_delta(args.delta, data_root=args.data_root, split=args.split, batch_size=args.batch_size,
                            device=args.device, weights=args.weights)
    print(json.dumps(result, indent=2))
    return 0


def cmd_cluster_validate(args: argparse.Namespace) -> int:
    from spt_ray.cluster import summarize_cluster_config, validate_cluster_config

    print(summarize_cluster_config(validate_cluster_config(args.file), args.file))
    return 0


# ---- parser -----------------------------------------------------------------------------------------
def _add_task_args(p: argparse.ArgumentParser, *, task_required: bool = True) -> None:
    p.add_argument("--suite", choices=SUITES, default="mini", help="task suite (default: the embedded mini suite)")
    p.add_argument("--task", required=task_required, help="task name, e.g. cifar or mini_count")
    p.add_argument("--data-root", help="folder holding <task>/ (default for mini: generated into --cache-dir)")
    p.add_argument("--img-size", type=int, help="input size (default: the task's native size)")
    p.add_argument("--cache-dir", default=os.environ.get("SPT_CACHE", "runs/cache"), help="where generated data goes")


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="spt-mini-vit", help="timm model name (default: the embedded ViT)")
    p.add_argument("--weights", help="local weights file (.npz Google ViT format, .pth/.pt, .safetensors)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="spt-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help_text: str,
                parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    from spt_ray.launch import add_tune_args

    add_tune_args(command("tune", cmd_tune, "run a sweep here or on the Ray cluster this machine is attached to"))

    p = command("sensitivity", cmd_sensitivity, "compute and store one task's sensitivity map")
    _add_task_args(p)
    _add_backbone_args(p)
    p.add_argument("--split", help="training split to score (default: the suite's own, train800 or FGVC's train; "
                                   "validation and test splits are refused: they would leak into the plan)")
    p.add_argument("--num-batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/sensitivity", help="output folder")

    p = command("plan", cmd_plan, "build a TuningPlan from a sensitivity map or from SPT's released allocations")
    p.add_argument("--source", choices=("computed", "released"), default="computed")
    p.add_argument("--sensitivity", help="a map written by `spt-ray sensitivity` (source computed)")
    p.add_argument("--task", help="VTAB-1k task (source released)")
    p.add_argument("--budget", type=parse_budget, required=True, help="trainable parameters, e.g. 0.4M")
    p.add_argument("--structured", choices=("lora", "adapter"), default="lora")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=finite_float, default=10.0, help="SPT's structured-switch divisor (> 0)")
    p.add_argument("--bits", type=int, choices=(1, 2))
    p.add_argument("--out", help="write the plan JSON here")

    results = sub.add_parser("results", help="query and plot the Parquet results of sweeps")
    from spt_ray.report import add_results_args

    add_results_args(results, command)

    p = command("export", cmd_export, "write one trial's task delta (safetensors + plan JSON)")
    p.add_argument("--storage", required=True, help="the sweep's storage folder or URI (s3://..., gs://...)")
    p.add_argument("--sweep", help="sweep name (default: the only one, or the newest)")
    p.add_argument("--trial-id", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--merged", action="store_true", help="also write merged.safetensors: a plain timm state dict "
                   "with the delta folded in and the task head (sparse, bias/LayerNorm and LoRA deltas; a plan "
                   "with Adapters is refused)")

    p = command("evaluate", cmd_evaluate, "load an exported delta onto its backbone and evaluate it")
    p.add_argument("--delta", required=True, help="folder (or storage URI) written by `spt-ray export`")
    p.add_argument("--data-root", help="folder holding <task>/ (default: the one recorded in the delta)")
    p.add_argument("--weights", help="backbone weights (default: the one recorded in the delta)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the trial's evaluation split)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = command("mini", cmd_data_mini, "write the embedded mini suite to disk in the VTAB-1k layout", data)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", type=_csv, help="comma-separated subset")
    p = command("probe", cmd_data_probe, "is the mini suite meaningful? train linear probe / LoRA / full "
                "fine-tuning per task on train800 and print test accuracy next to chance", data)
    p.add_argument("--out", required=True, help="folder for the suite (written there if absent)")
    p.add_argument("--tasks", type=_csv, help="comma-separated subset (default: all eight)")
    p.add_argument("--methods", type=_csv, default=["linear", "lora", "full"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--json", help="also write the rows to this JSON file")
    _add_backbone_args(p)

    backbone = sub.add_parser("backbone", help="the embedded backbone").add_subparsers(dest="bb_command",
                                                                                      required=True)
    p = command("pretrain", cmd_backbone_pretrain, "pretrain the embedded ViT on its generated upstream task",
                backbone)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="optimizer steps (default: the shipped recipe's, "
                                              "spt_core.embedded.PRETRAIN_STEPS)")
    p = command("info", cmd_backbone_info, "show a backbone's provenance (weights hash, size)", backbone)
    _add_backbone_args(p)

    cluster = sub.add_parser("cluster", help="Ray cluster configs").add_subparsers(dest="cl_command", required=True)
    p = command("validate", cmd_cluster_validate, "validate a cluster-launcher config offline", cluster)
    p.add_argument("file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from spt_ray.faults import report_errors

    return report_errors(lambda: int(args.func(args) or 0), f"spt-ray {args.command}")


if __name__ == "__main__":
    sys.exit(main())
