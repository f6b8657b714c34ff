"""Time each phase of a MoGAN iteration, and a MoGAN iteration over a DMD-only one, in one run.

    python benchmarks/train_step.py                       # the tiny recipe on CPU (world 1)
    deepspeed --num_gpus 8 benchmarks/train_step.py --config wan2.1-t2v-1.3b \
        --ds_config ds_configs/zero3_bf16.json [key=value ...]

One trainer is built; after a warm-up iteration, MoGAN iterations (all four phases) and
DMD-only iterations (phases 1-2: the same trainer with the GAN switched off) alternate,
so both are measured side by side under the same conditions. Medians are printed; the
last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero3_cpu.json"))
    ap.add_argument("--rounds", type=int, default=3, help="measured MoGAN/DMD-only pairs")
    ap.add_argument("--workdir", default=str(REPO / ".cache" / "mogan_tiny"), help="tiny models/data (tiny recipe)")
    ap.add_argument("--local_rank", type=int, default=-1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)

    from mogan_ds.config import load_config
    from mogan_ds.train.step import PHASES
    from mogan_ds.train.trainer import MoGANTrainer

    overrides = list(args.overrides)
    if args.config == "tiny":
        from mogan_ds.cli.demo import prepare_tiny_workdir, tiny_overrides

        overrides = tiny_overrides(prepare_tiny_workdir(args.workdir)) + overrides
    run_dir = tempfile.mkdtemp(prefix="mogan_bench_")
    cfg = load_config(
        args.config, [*overrides, f"output.run_dir={run_dir}", "logging.wandb_mode=disabled", "logging.sample_every=0"]
    )
    trainer = MoGANTrainer(cfg, args.ds_config)

    def iteration(step: int, gan: bool) -> tuple[float, dict]:
        trainer.cfg.gan.enabled = gan
        t0 = time.perf_counter()
        logs = trainer.iteration.train_step(step)
        return time.perf_counter() - t0, logs

    iteration(0, True)  # warm-up: allocator, kernels, data workers
    mogan, dmd_only, phases = [], [], {p: [] for p in PHASES}
    for r in range(args.rounds):
        dt, logs = iteration(1 + 2 * r, True)
        mogan.append(dt)
        for p in PHASES:
            phases[p].append(logs.get(f"time_{p}", 0.0))
        dmd_only.append(iteration(2 + 2 * r, False)[0])
    trainer.cfg.gan.enabled = True

    med = {p: statistics.median(v) for p, v in phases.items()}
    result = {
        "recipe": args.config,
        "rounds": args.rounds,
        **{f"time_{p}_s": round(v, 4) for p, v in med.items()},
        "mogan_iteration_s": round(statistics.median(mogan), 4),
        "dmd_only_iteration_s": round(statistics.median(dmd_only), 4),
    }
    result["mogan_over_dmd_only"] = round(result["mogan_iteration_s"] / result["dmd_only_iteration_s"], 3)
    if trainer.rank0:
        print(
            f"recipe {args.config}, {args.rounds} measured rounds (median), critic updates {cfg.dmd.critic_updates}, "
            f"decode window {cfg.gan.window} of {cfg.latent_frames} latent chunks"
        )
        for p in PHASES:
            print(f"  phase {p:<14} {med[p]:8.3f} s")
        print(f"  MoGAN iteration     {result['mogan_iteration_s']:8.3f} s")
        print(f"  DMD-only iteration  {result['dmd_only_iteration_s']:8.3f} s")
        print(f"  MoGAN / DMD-only    {result['mogan_over_dmd_only']:8.3f} x")
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
