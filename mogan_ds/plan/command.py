"""`python -m mogan_ds plan`: argument wiring (the parser lives in mogan_ds.__main__)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError, load_config
from ..train.roles import load_ds_config
from .hardware import DEFAULT_MFU, GPUS

OFFLOAD_PRESET = Path(__file__).resolve().parents[2] / "ds_configs" / "zero3_bf16_offload.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML or shipped recipe name")
    p.add_argument("--ds_config", required=True, help="DeepSpeed JSON (ZeRO stage, precision, offload)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--gpus-per-node", dest="gpus_per_node", type=int, default=8, help="GPUs per node")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU model (peak bf16 and memory)")
    p.add_argument(
        "--mfu", type=float, default=DEFAULT_MFU, help="model-FLOP utilisation assumed for the time estimate"
    )
    p.add_argument(
        "--no-suggest", dest="suggest", action="store_false", help="skip planning the fixes when it does not fit"
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def run(args: argparse.Namespace) -> str:
    from .report import make_plan, render, suggestions

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    cfg = load_config(args.config, args.overrides)
    ds = load_ds_config(args.ds_config)
    plan = make_plan(cfg, ds, args.nodes, args.gpus_per_node, args.gpu, args.mfu)
    fixes = None
    if not plan.fits and args.suggest:
        offload = load_ds_config(OFFLOAD_PRESET) if OFFLOAD_PRESET.is_file() else None
        fixes = suggestions(plan, ds, offload)
    return render(plan, fixes)
