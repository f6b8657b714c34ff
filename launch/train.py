"""MoGAN training entry point, started by DeepSpeed's launcher on every rank.

    deepspeed [--hostfile launch/hostfile] launch/train.py \
        --ds_config ds_configs/zero3_bf16.json --config <recipe.yaml | tiny | wan2.1-t2v-1.3b> \
        [--resume] [key.sub=value ...]

Multi-node: a DeepSpeed hostfile (`launch/hostfile.example`) and a run directory
(`output.run_dir`) on a filesystem every node sees.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ds_config", required=True, help="DeepSpeed JSON (ds_configs/*.json)")
    ap.add_argument("--config", required=True, help="recipe YAML, or a shipped recipe name")
    ap.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint of output.run_dir")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    args = ap.parse_intermixed_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mogan_ds.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        from mogan_ds.trainer import MoGANTrainer

        trainer = MoGANTrainer(cfg, args.ds_config, resume=args.resume)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError) as e:  # missing weights/data, or a run dir that would be overwritten
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
