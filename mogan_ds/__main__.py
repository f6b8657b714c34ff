"""Command line: `python -m mogan_ds <command>`.

    info  --config <recipe> [--ds_config x.json] [key=value ...]
          resolved config + parameter count and memory of every network (meta device),
          after the checks the trainer runs before loading (SP size vs the DiT's heads,
          the discriminator's blocks vs the DiT's, the DeepSpeed JSON)
    info  --help-keys
          every config key with its default, help, valid range and choices
    demo  [--workdir .cache/mogan_tiny] [--run_dir runs/tiny] [--num_ranks 2] [key=value ...]
          the embedded tiny default: tiny models + synthetic shards if absent, then the
          real `deepspeed` launcher on CPU ranks running launch/train.py
    plan  --config <recipe> --ds_config x.json [--nodes N] [--gpus-per-node G] [--gpu h100|h200] [key=value ...]
          one rank of a training iteration on fake tensors at the recipe's shape: FLOPs per
          phase and network, per-rank memory, communication, estimated time, fits or not
    export --run-dir <dir> [--step N] [--ema] [--critics] --out <folder>
          any complete checkpoint -> a WanPipeline folder (the generator, or its EMA), offline
          (no training world); --critics adds the fake score and discriminator as safetensors

A bad setting or a missing/malformed file ends in one line on stderr and exit code 2;
`--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from .cli.errors import add_debug_flag, user_errors
from .cli.export import add_arguments as add_export_arguments
from .config import load_config
from .plan.command import add_arguments as add_plan_arguments
from .plan.command import run as run_plan


def _trainable_dtype(ds: dict | None) -> str:
    if ds is None:
        return "bf16"
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mogan_ds", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="resolved config and per-network parameter counts and memory")
    p_info.add_argument("--config", help="recipe YAML or shipped recipe name (required unless --help-keys)")
    p_info.add_argument("--ds_config", default=None, help="DeepSpeed JSON (sets the trainable precision)")
    p_info.add_argument(
        "--help-keys",
        dest="help_keys",
        action="store_true",
        help="list every config key with its default, help and valid range",
    )
    add_debug_flag(p_info)
    p_info.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p_demo = sub.add_parser("demo", help="run the embedded tiny default end to end")
    p_demo.add_argument(
        "--workdir", default=".cache/mogan_tiny", help="where tiny models, shards and prompt embeddings go"
    )
    p_demo.add_argument("--num_ranks", type=int, default=2, help="CPU ranks the deepspeed launcher starts")
    p_demo.add_argument("--ds_config", default="ds_configs/zero3_cpu.json", help="DeepSpeed JSON for the demo")
    add_debug_flag(p_demo)
    p_demo.add_argument("overrides", nargs="*", help="key.sub=value overrides of the tiny recipe")
    p_plan = sub.add_parser("plan", help="one rank of an iteration on fake tensors: FLOPs, memory, communication, fit")
    add_plan_arguments(p_plan)
    add_debug_flag(p_plan)
    p_export = sub.add_parser("export", help="a checkpoint of a run -> WanPipeline folder, without the training world")
    add_export_arguments(p_export)
    add_debug_flag(p_export)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd == "info" and not args.help_keys and not args.config:
        ap.error("info: --config is required (or --help-keys)")
    if args.cmd == "demo" and args.num_ranks < 1:
        ap.error("demo: --num_ranks must be >= 1")

    # Each subcommand imports what it runs, lazily: a typo in a setting is reported before
    # the heavy modules (DeepSpeed, diffusers) load.
    with user_errors(args.debug, f"python -m mogan_ds {args.cmd}") as outcome:
        if args.cmd == "info":
            from .cli.info import format_help_keys, run_info

            if args.help_keys:
                print(format_help_keys())
                return 0
            from .train.roles import load_ds_config

            cfg = load_config(args.config, args.overrides)
            # The trainer's own reader: a missing, malformed or clashing JSON fails here too.
            ds = load_ds_config(args.ds_config) if args.ds_config else None
            print(run_info(cfg, _trainable_dtype(ds)))
            return 0
        if args.cmd == "plan":
            print(run_plan(args))
            return 0
        if args.cmd == "export":
            from .cli.export import run as run_export

            run_export(args)
            return 0
        if args.cmd == "demo":
            from .cli.demo import run_demo
            from .train.roles import load_ds_config

            # Bad overrides or a bad JSON fail here, before tiny models and shards are built
            # and before every launched rank would print the same error.
            load_config("tiny", args.overrides)
            load_ds_config(args.ds_config)
            return run_demo(args.workdir, args.num_ranks, args.ds_config, args.overrides)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
