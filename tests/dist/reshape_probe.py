"""Resume-onto-another-shape worker; run through the real launcher like launch/train.py:

    deepspeed --num_gpus 2 tests/dist/reshape_probe.py --ds_config X --config tiny --probe out.pt \
        output.run_dir=<run written on another layout> parallel.sp_size=2 ...

Builds the trainer with --resume (so through `reshard` when the layout differs), then,
before any step, gathers what the resumed run holds: every engine's full fp32 masters
(`export.full_fp32_state_dict`, collective) and the generator's full EMA (the EMA swapped
into the masters, the way the trainer's export reads it). Rank 0 saves them with the
layout and step to --probe; then the run trains on to train.max_steps as train.py would.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mogan_ds.config import load_config  # noqa: E402
from mogan_ds.checkpoint.export import full_fp32_state_dict  # noqa: E402
from mogan_ds.train.trainer import MoGANTrainer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ds_config", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--probe", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    logging.basicConfig(level=logging.INFO)
    trainer = MoGANTrainer(load_config(args.config, args.overrides), args.ds_config, resume=True)

    def params(module) -> dict:
        # parameters only: the buffers (RoPE tables) are rebuilt by the model, not checkpointed
        names = {n for n, _ in module.named_parameters()}
        return {k: v for k, v in full_fp32_state_dict(module).items() if k in names}

    probe = {role: params(engine.module) for role, engine in trainer.engines.items()}
    with trainer.ema.swapped_in():
        probe["ema"] = params(trainer.engines.generator.module)
    if trainer.rank0:
        layout = {"dp": trainer.topo.dp_size, "sp": trainer.topo.sp_size}
        clips = trainer.clips.state_dict() if trainer.clips is not None else None
        torch.save({**probe, "layout": layout, "step": trainer.step, "clips": clips}, args.probe)
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
