"""The toy-world MoGAN experiment, one command (`make experiment`; stages cached and resumable).

    python -m experiments.toy_motion.run [--scale full|smoke|gpu] [--device auto|cpu|cuda] [--work DIR] [--results DIR] [--stages data raft ...]
    python -m experiments.toy_motion.run --work DIR --remeasure-with OTHER/raft/raft_small.pth
    python -m experiments.toy_motion.run --work DIR --reuse-stage vae=SAVED/vae [--save-stage STAGE=DIR]

Stages: data, raft, vae, teacher, dmd, mogan, eval (README.md in this folder, "Stages").
The stages are `experiments/toy_motion/stages/`, run in order by `pipeline.Experiment` over a work
folder (`workdir.py`: recipes, keys, cached and kept stages).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.toy_motion.pipeline import Experiment  # noqa: E402
from experiments.toy_motion.training import pick_device  # noqa: E402
from experiments.toy_motion.workdir import HERE, REPO, SCALES, STAGES  # noqa: E402


def stage_dir(item: str) -> tuple[str, str]:
    """argparse type of --reuse-stage / --save-stage: STAGE=DIR -> (STAGE, DIR)."""
    stage, sep, folder = item.partition("=")
    if not sep or stage not in STAGES or not folder:
        raise argparse.ArgumentTypeError(f"expected STAGE=DIR with STAGE one of {', '.join(STAGES)}, got {item!r}")
    return stage, folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--scale", choices=tuple(SCALES), default="full", help="full (2 CPU cores), smoke (CI), gpu (one H200)"
    )
    ap.add_argument(
        "--device",
        default="auto",
        help="where stages 2-7 train, render and measure: auto (CUDA when present, else the CPU), cpu, cuda[:N]",
    )
    ap.add_argument("--work", default=None, help="work folder (default .cache/toy_motion/<scale>)")
    ap.add_argument("--results", default=None, help="results folder (default: experiments/toy_motion/results at full)")
    ap.add_argument("--stages", nargs="*", choices=STAGES, help="only these stages (default: all not yet done)")
    ap.add_argument(
        "--remeasure-with",
        metavar="RAFT_PTH",
        help="instead of running stages: stage 7 on the work folder's finished models, measured with this "
        "toy RAFT state dict (e.g. another run's raft/raft_small.pth)",
    )
    ap.add_argument(
        "--reuse-stage",
        action="append",
        default=[],
        type=stage_dir,
        metavar="STAGE=DIR",
        help="take DIR (saved by --save-stage, or another work folder's stage) as this work folder's finished "
        "STAGE; refused unless made by the same recipes",
    )
    ap.add_argument(
        "--save-stage",
        action="append",
        default=[],
        type=stage_dir,
        metavar="STAGE=DIR",
        help="after the run, copy the finished STAGE's folder to DIR without its training checkpoint",
    )
    args = ap.parse_args(argv)
    import torch

    device = pick_device(args.device)
    # The CPU path keeps the 2 threads it was sized on; with an accelerator the host's cores
    # serve the data stage and the measurements' CPU parts.
    torch.set_num_threads(min(2, os.cpu_count() or 1) if device.type == "cpu" else (os.cpu_count() or 1))
    work = Path(args.work or REPO / ".cache" / "toy_motion" / args.scale)
    results = args.results or (HERE / "results" if args.scale == "full" else work / "results")
    t0 = time.time()
    exp = Experiment(work, args.scale, results, device=device)
    print(f"[toy] scale {args.scale}, device {device}", flush=True)
    for stage, folder in args.reuse_stage:
        exp.reuse_stage(stage, folder)
    if args.remeasure_with:
        reports = {"eval": exp.remeasure(args.remeasure_with)}
    else:
        reports = exp.run(args.stages)
    for stage, folder in args.save_stage:
        exp.save_stage(stage, folder)
    print(json.dumps({"wall_seconds": round(time.time() - t0, 1), **reports}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
