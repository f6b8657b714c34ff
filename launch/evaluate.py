#!/usr/bin/env python
"""Evaluate generators side by side with VBench's motion and quality metrics (the paper's Table 1).

    python launch/evaluate.py --config <recipe> --prompts prompts/vbench_dynamic_degree.txt \\
        --model mogan=runs/mogan --model dmd=checkpoints/wan-1.3b-dmd-3step \\
        [--teacher wan-50step --teacher-steps 50] --seeds 0 1 2 --out eval/ \\
        --raft checkpoints/eval/raft-things.pth --amt checkpoints/eval/amt-s.pth \\
        --clip checkpoints/eval/clip-vit-large-patch14 --aesthetic checkpoints/eval/sa_0_4_vit_l_14_linear.pth \\
        --musiq checkpoints/eval/musiq_spaq_ckpt-358bb6af.pth

Generators: --model NAME=PATH (repeatable), PATH a diffusers WanTransformer3DModel folder or
a run directory / export (as launch/sample.py --checkpoint); --teacher [NAME] adds
models.root/transformer sampled with the teacher's CFG sampler (--teacher-steps, default
schedule.teacher_steps). VAE and text encoder come from models.root of --config (default:
the first --model's run config.yaml).

Output in --out: videos/<model>/seed<S>/NNNN_<slug>.mp4 (reused when present: an interrupted
evaluation resumes), metrics.jsonl (per video), results.json, results.md (the paper's
Table 1 layout) and results.png. Each metric whose weights are not given is n/a.

Distributed: `deepspeed --num_gpus N launch/evaluate.py ...` splits the videos across ranks;
rank 0 writes the table. Errors in what was given end in one stderr line, exit code 2
(--debug shows the traceback). The library is `mogan_ds.eval.runner`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import mogan_ds  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mogan_ds.cli.errors import add_generation_tail, default_device, user_errors


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="NAME=PATH of a generator (repeatable)")
    ap.add_argument("--teacher", nargs="?", const="teacher", default=None, help="also evaluate the teacher [as NAME]")
    ap.add_argument("--teacher-steps", dest="teacher_steps", type=int, default=None, help="teacher sampler steps")
    ap.add_argument("--config", help="recipe YAML or shipped name (default: the first --model's run config.yaml)")
    ap.add_argument("--prompts", required=True, help="text file, one prompt per line (or .jsonl with 'prompt')")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; every model uses the same ones")
    ap.add_argument("--out", required=True, help="output folder (re-running resumes)")
    ap.add_argument(
        "--raft", help="RAFT weights for dynamics degree: VBench's raft-things.pth (or torchvision raft_large)"
    )
    ap.add_argument("--amt", help="AMT-S weights for motion smoothness: amt-s.pth")
    ap.add_argument("--clip", help="CLIP ViT-L/14 transformers folder for aesthetic quality")
    ap.add_argument("--aesthetic", help="LAION aesthetic predictor: sa_0_4_vit_l_14_linear.pth")
    ap.add_argument("--musiq", help="MUSIQ (SPAQ) weights for imaging quality (needs the eval-iqa extra: pyiqa)")
    ap.add_argument("--device", default=None, help="torch device (default: this rank's cuda device, else cpu)")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="generator dtype")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_generation_tail(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.teacher_steps is not None and args.teacher_steps < 1:
        ap.error(f"--teacher-steps must be >= 1, got {args.teacher_steps}")
    with user_errors(args.debug, "evaluate.py") as outcome:
        from mogan_ds.eval.metrics import EvalWeights
        from mogan_ds.eval.runner import ModelSpec, evaluate, init_distributed_from_env, parse_model

        init_distributed_from_env()
        device = args.device or default_device()
        models = [parse_model(m) for m in args.model]
        if args.teacher is not None:
            models.append(ModelSpec(name=args.teacher, teacher=True))
        evaluate(
            out=args.out,
            models=models,
            prompts=args.prompts,
            seeds=args.seeds,
            config=args.config,
            overrides=args.overrides,
            weights=EvalWeights(args.raft, args.amt, args.clip, args.aesthetic, args.musiq),
            teacher_steps=args.teacher_steps,
            device=device,
            dtype=args.dtype,
            vae_dtype=args.vae_dtype,
            progress=args.progress,
        )
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
