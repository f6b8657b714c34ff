"""MoGAN training entry point, started by DeepSpeed's launcher on every rank.

    deepspeed [--hostfile launch/hostfile] launch/train.py \
        --ds_config ds_configs/zero3_bf16.json --config <recipe.yaml | tiny | wan2.1-t2v-1.3b> \
        [--resume [--verify]] [--debug] [key.sub=value ...]

Multi-node: a DeepSpeed hostfile (`launch/hostfile.example`) and a run directory
(`output.run_dir`) on a filesystem every node sees.

Exit codes (docs/checkpoints.md, "Guarantees"):
  0   the run reached train.max_steps and was exported
  2   a bad setting, a missing or malformed file, missing weights, or --resume finding only
      damaged checkpoints: one line on stderr (`--debug` shows the traceback)
  74  a checkpoint could not be written (disk full, I/O error, permission): one line naming
      the file, the error and the free space; the previous checkpoint is intact
  75  stopped on request (output.exit_signals, default SIGTERM and SIGUSR1, or the launcher
      exiting) with a complete checkpoint of that step, or the resumed checkpoint could not
      be loaded and was marked damaged: run again with --resume (Slurm: requeue)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

try:
    import mogan_ds  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mogan_ds.cli.errors import EXIT_REQUEUE, EXIT_STORAGE, add_debug_flag, one_line, user_errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ds_config", required=True, help="DeepSpeed JSON (ds_configs/*.json)")
    ap.add_argument("--config", required=True, help="recipe YAML, or a shipped recipe name")
    ap.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint of output.run_dir"
    )
    ap.add_argument(
        "--verify",
        action="store_true",
        help="with --resume: check every file's CRC-32 against the checkpoint's manifest, not only its size "
        "(output.verify_on_resume=checksums)",
    )
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    add_debug_flag(ap)
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    args = ap.parse_intermixed_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Set-up mistakes (settings, missing weights/data/JSON, a run dir holding checkpoints)
    # are one line and exit 2 on every rank, before any weights load. Failures during
    # training are not input mistakes and keep their traceback.
    from mogan_ds.checkpoint.storage import CheckpointReadError, CheckpointWriteError

    try:
        with user_errors(args.debug, "train.py") as outcome:
            from mogan_ds.config import load_config
            from mogan_ds.train.roles import load_ds_config

            cfg = load_config(
                args.config, args.overrides + (["output.verify_on_resume=checksums"] if args.verify else [])
            )
            load_ds_config(args.ds_config)  # checked before the process group starts
            from mogan_ds.train.preemption import StopRequest
            from mogan_ds.train.trainer import MoGANTrainer  # heavy (deepspeed): after the cheap checks

            # Before the set-up: a signal while the models load stops the run at its first boundary.
            stop = StopRequest(cfg.output.exit_signals).install()
            trainer = MoGANTrainer(cfg, args.ds_config, resume=args.resume, stop=stop)
    except CheckpointReadError as e:
        # The resumed checkpoint is now marked damaged; the next --resume takes an older one.
        print(f"train.py: error: {one_line(e)}", file=sys.stderr, flush=True)
        os._exit(EXIT_REQUEUE)  # peers may wait in a collective on this rank: nothing else is pending
    if outcome.exit_code:
        return outcome.exit_code
    try:
        stopped = trainer.fit()
    except CheckpointWriteError as e:
        stop.ignore()
        # Every rank raises it (the ranks agreed on the failure); one of them tells the user.
        if trainer.rank0:
            print(f"train.py: error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_STORAGE
    except Exception as e:
        from mogan_ds.parallel.failures import is_peer_failure, peer_failure_message

        if not is_peer_failure(e):
            raise
        msg = peer_failure_message(e, trainer.topo.rank, cfg.parallel.timeout_minutes, trainer.ckpt.latest())
        print(f"train.py: error: {msg}", file=sys.stderr, flush=True)
        # os._exit: the interpreter's own teardown of the process groups can block on the
        # very peer that failed; the message is out, nothing else is pending.
        os._exit(1)
    if stopped:
        stop.ignore()  # saved and agreed: a further signal must not change the exit code
        return EXIT_REQUEUE
    return 0


if __name__ == "__main__":
    sys.exit(main())
