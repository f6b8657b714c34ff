"""Command line: `python -m mogan_ds <command>`.

    info  --config <recipe> [--ds_config x.json] [key=value ...]
          resolved config + parameter count and memory of every network (meta device)
    demo  [--workdir .cache/mogan_tiny] [--run_dir runs/tiny] [--num_ranks 2] [key=value ...]
          the embedded tiny default: tiny models + synthetic shards if absent, then the
          real `deepspeed` launcher on CPU ranks running launch/train.py
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, load_config


def _trainable_dtype(ds_config: str | None) -> str:
    if not ds_config:
        return "bf16"
    with open(ds_config) as fh:
        ds = json.load(fh)
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mogan_ds", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="resolved config and per-network parameter counts and memory")
    p_info.add_argument("--config", required=True, help="recipe YAML or shipped recipe name")
    p_info.add_argument("--ds_config", default=None, help="DeepSpeed JSON (sets the trainable precision)")
    p_info.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p_demo = sub.add_parser("demo", help="run the embedded tiny default end to end")
    p_demo.add_argument("--workdir", default=".cache/mogan_tiny", help="where tiny models, shards and prompt embeddings go")
    p_demo.add_argument("--num_ranks", type=int, default=2, help="CPU ranks the deepspeed launcher starts")
    p_demo.add_argument("--ds_config", default="ds_configs/zero3_cpu.json", help="DeepSpeed JSON for the demo")
    p_demo.add_argument("overrides", nargs="*", help="key.sub=value overrides of the tiny recipe")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "info":
            from .info import run_info

            cfg = load_config(args.config, args.overrides)
            print(run_info(cfg, _trainable_dtype(args.ds_config)))
            return 0
        if args.cmd == "demo":
            from .demo import run_demo

            return run_demo(args.workdir, args.num_ranks, args.ds_config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
