"""From command-line flags to a finished sweep: shared by `spt-ray tune` and the sweeps/*.py scripts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .spec import SweepSpec


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_tune_args(p: argparse.ArgumentParser, *, suite: str | None = None) -> argparse.ArgumentParser:
    """Flags of a sweep; each overrides one key of the suite's recipe (spt_ray/suites.py)."""
    if suite is None:
        p.add_argument("--suite", choices=("mini", "vtab", "fgvc"), default="mini",
                       help="task suite and its recipe (default: the embedded mini suite)")
    p.add_argument("--config", help="YAML file with SweepSpec keys, applied over the recipe")
    p.add_argument("--tasks", type=_csv, help="comma-separated subset of the suite's tasks")
    p.add_argument("--data-root", help="folder holding <task>/ (mini: generated here if missing; default "
                                       "<storage>/data)")
    p.add_argument("--storage", help="results, maps and checkpoints: a folder, shared mount or s3:// URI "
                                     "(default runs/<name>)")
    p.add_argument("--name", help="sweep name (default: the suite's)")
    p.add_argument("--num-samples", type=int, help="searched trials per task")
    p.add_argument("--epochs", type=int, help="epochs of every run (search and final)")
    p.add_argument("--final-seeds", type=lambda s: [int(x) for x in _csv(s)], help="e.g. 42,44,82,100,800")
    p.add_argument("--no-final", action="store_true", help="search only; skip the final retraining")
    p.add_argument("--baselines", type=_csv, help="comma-separated baselines (linear,full,bitfit,lora,adapter)")
    p.add_argument("--backbone", help="timm model name")
    p.add_argument("--weights", help="local backbone weights (.npz, .pth, .safetensors)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once")
    p.add_argument("--checkpoint-every", type=int, help="epochs between a trial's checkpoints (and after its last)")
    p.add_argument("--cpus-per-trial", type=float)
    p.add_argument("--gpus-per-trial", type=float, help="fractional allowed, e.g. 0.25")
    p.add_argument("--multi-objective", action="store_true",
                   help="multi-objective TPE on (val_acc, storage bytes of the task delta); every front point retrained")
    p.add_argument("--sampler", choices=("tpe", "random"), help="tpe (multivariate, constant liar; default) or random")
    p.add_argument("--no-warm-start", action="store_true", help="studies start cold (no paper configurations)")
    p.add_argument("--warm-start-from", help="seed each task's study with this sweep's trials (same space)")
    p.add_argument("--optuna-storage", help="where the Optuna studies live: an RDB URL (sqlite:///studies.db), a "
                                            "journal file or 'memory' (default <storage>/optuna/<name>.journal)")
    p.add_argument("--address", help="Ray address (default: attach to a running cluster, else start locally)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.add_argument("--smoke", action="store_true", help="a minute-long version on the mini suite")
    p.add_argument("--json", action="store_true", help="print the SweepResult as JSON")
    p.add_argument("--callback", action="append", type=_csv, metavar="NAME",
                   help="experiment tracker through Ray Tune's integration: wandb, mlflow or tensorboard (repeat "
                        "or comma-separate; each an extra: pip install 'spt-ray[wandb]')")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Ray's and Tune's own output (worker logs, Tune's trial tables)")
    return p


def spec_from_args(args: argparse.Namespace, suite: str) -> dict[str, Any]:
    """The suite's recipe with the config file and the flags applied, as a SweepSpec dict."""
    from .suites import recipe

    spec = recipe(suite, smoke=args.smoke)
    if args.config:
        from .validate import read_yaml_mapping

        spec.update(read_yaml_mapping(args.config, "--config"))
    flags = {"tasks": args.tasks, "name": args.name, "num_samples": args.num_samples,
             "final_seeds": args.final_seeds, "baselines": args.baselines, "max_concurrent": args.max_concurrent,
             "checkpoint_every": args.checkpoint_every,
             "address": args.address, "sampler": args.sampler, "warm_start_from": args.warm_start_from,
             "optuna_storage": args.optuna_storage}
    spec.update({k: v for k, v in flags.items() if v is not None})
    if args.epochs is not None:
        spec["train"] = {**spec.get("train", {}), "epochs": args.epochs}
        spec["train"]["warmup_epochs"] = min(spec["train"].get("warmup_epochs", 0), max(0, args.epochs - 1))
    if args.backbone or args.weights:
        spec["backbone"] = {**spec.get("backbone", {}), **({"name": args.backbone} if args.backbone else {}),
                            **({"weights": args.weights} if args.weights else {})}
    if args.cpus_per_trial is not None or args.gpus_per_trial is not None:
        res = dict(spec.get("resources", {}))
        res.update({k: v for k, v in (("cpu", args.cpus_per_trial), ("gpu", args.gpus_per_trial)) if v is not None})
        spec["resources"] = res
    spec["multi_objective"] = bool(args.multi_objective or spec.get("multi_objective"))
    if args.no_warm_start:
        spec["paper_warm_start"] = False
    spec["resume"] = bool(args.resume)
    spec["verbose"] = bool(args.verbose or spec.get("verbose"))
    if args.callback:  # added to the config file's `callbacks`
        named = spec.get("callbacks") or []
        extra = [name for group in args.callback for name in group]
        spec["callbacks"] = [*([named] if isinstance(named, str) else named), *extra]
    spec["run_final"] = not args.no_final and spec.get("run_final", True)
    spec["storage"] = args.storage or spec.get("storage") or str(Path("runs") / spec["name"])
    spec["data_root"] = args.data_root or spec.get("data_root") or _default_data_root(spec)
    return spec


def _default_data_root(spec: dict[str, Any]) -> str:
    if spec["suite"] != "mini":
        raise ValueError(f"--data-root is required for the {spec['suite']} suite (the folder holding <task>/)")
    return str(Path(spec["storage"]) / "data") if "://" not in spec["storage"] else str(Path("runs") / "data")


def prepare_data(spec: SweepSpec) -> None:
    """The mini suite is generated on first use; real suites must already be on disk.

    Only missing mini tasks are generated: a task folder already there is the user's data (maybe a
    smaller or edited copy) and is checked, never silently replaced, by the sweep's preflight.
    """
    root = Path(spec.data_root)
    if spec.suite == "mini":
        from spt_core.data.mini import write_mini_suite

        missing = [t for t in spec.tasks if not (root / t).exists()]
        if missing:
            write_mini_suite(root, tasks=missing)
    elif not root.is_dir():
        raise ValueError(f"--data-root {root} is not a folder; put the {spec.suite} data there "
                         f"(see cluster/README.md)")


def run_from_args(args: argparse.Namespace, suite: str | None = None):
    from .driver import run_sweep
    from .preflight import check_storage
    from .spec import SweepSpec

    data = spec_from_args(args, suite or args.suite)
    spec = SweepSpec.from_dict(data)
    check_storage(spec.storage)  # before the mini data is generated under it (its default place)
    prepare_data(spec)
    result = run_sweep(spec)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1, default=str))
    else:
        print_summary(result)
    return result


def print_summary(result) -> None:
    """The sweep's answer: per task, the selected SPT config and the final test accuracy of each method."""
    print(f"\nsweep {result.name}: results in {result.results_path}")
    labels = sorted({label for labels in result.final.values() for label in labels},
                    key=lambda x: (x != "best", x))
    header = f"{'task':<14}{'selected (val)':<34}" + "".join(f"{_label(l):>19}" for l in labels)
    print(header)
    for task in sorted(set(result.best) | set(result.final)):
        b = result.best.get(task)
        chosen = (f"{b['method']} {b['trainable_params']:,}p {100 * b['val_acc']:.1f}%" if b else "-")
        cells = []
        for label in labels:
            e = result.final.get(task, {}).get(label)
            unequal = e and e.get("budget_ratio") is not None and not e.get("equal_budget")
            cells.append(f"{100 * e['mean']:6.1f}±{100 * e['std']:4.1f} {_short(e['trainable_params']):>6}"
                         f"{'*' if unequal else ' '}" if e else "-")
        print(f"{task:<14}{chosen:<34}" + "".join(f"{c:>19}" for c in cells))
    if result.final:
        means = {label: [result.final[t][label]["mean"] for t in result.final if label in result.final[t]]
                 for label in labels}
        print(f"{'mean':<14}{'':<34}" + "".join(
            f"{100 * sum(v) / len(v):>11.1f}{'':>8}" if v else f"{'-':>19}" for v in means.values()))
        print("test accuracy (%) mean±std over the final seeds; trainable parameters (head excluded) beside it; "
              "* = budget not within ±10% of the selected SPT plan's (budget_ratio in `spt-ray results final`)")
    o = result.overhead
    if o:
        print(f"wall {o['wall_s']:.0f}s; share outside training+evaluation {100 * o['share']:.1f}% "
              f"(within trials {100 * o['trial_share']:.1f}%)")


def _label(label: str) -> str:
    return "SPT (selected)" if label == "best" else label


def _short(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def script_main(suite: str, argv: list[str] | None = None) -> int:
    """Entry point of sweeps/<suite>.py (and what `ray submit cluster.yaml sweeps/<suite>.py -- ...` runs)."""
    parser = add_tune_args(argparse.ArgumentParser(description=f"SPT sweep over the {suite} suite"), suite=suite)
    args = parser.parse_args(argv)
    from .faults import report_errors

    def command() -> int:
        run_from_args(args, suite)
        return 0

    return report_errors(command, f"sweeps/{suite}.py")
