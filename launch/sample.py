#!/usr/bin/env python
"""Render mp4 samples from the few-step generator (or the teacher), deterministic for a seed.

    python launch/sample.py --config <recipe> [--generator DIR | --checkpoint DIR] \\
        (--prompts FILE | --prompt-embeds FILE.pt) --out DIR [--seed 0] [--teacher] [key=value ...]

Weights (all local diffusers-format folders, nothing is downloaded):
  --generator DIR     a `WanTransformer3DModel` folder (config.json + *.safetensors).
  --checkpoint DIR    a training run's exported generator in that format, the first of
                      DIR, DIR/transformer, DIR/generator, DIR/export/transformer,
                      DIR/export/generator that holds one. The trainer's export
                      (mogan_ds/checkpoint/export.py) is `<run_dir>/export/`, a WanPipeline folder
                      whose transformer/ is the generator, so `--checkpoint <run_dir>` works.
                      DeepSpeed engine checkpoints (`<run_dir>/checkpoints/step_N/`) hold
                      ZeRO partitions, not a diffusers folder: export them first.
  neither             models.generator of the config (models.root/transformer if empty).
  --teacher           models.root/transformer with the teacher's multi-step CFG sampler
                      (schedule.teacher_steps / teacher_shift / teacher_guidance_scale).
  VAE, text encoder and tokenizer always come from models.root.

Config: --config (recipe or shipped name) + key=value overrides. With --checkpoint and no
--config, the run's resolved `config.yaml` is looked up in DIR and its two parents.

Prompts:
  --prompts FILE      one prompt per line (blank lines and '#' lines skipped), or .jsonl
                      with {"prompt": ...}; encoded with models.root's UMT5 exactly as
                      WanPipeline does, text.max_length tokens.
  --prompt-embeds F   torch.save'd dict {"embeds": [N, L, D], "prompts": [N str]}, optionally
                      "negative_embeds": [1 or N, L, D] (the teacher's unconditional input;
                      without it the text encoder is loaded to encode --negative-prompt,
                      by default the config's text.negative_prompt).

Output: DIR/NNNN_<prompt-slug>.mp4 (libx264, video.fps) and DIR/samples.json.
Determinism: sample i draws its initial and re-noising noise from a CPU generator seeded
with hash(--seed, i), so a seed gives the same noise on any device and any --batch-size;
the same seed on the same machine gives identical frames.

Errors: a missing or malformed prompts/embeddings file, a --checkpoint or --generator
folder that does not exist, missing weights or a bad setting end in one line on stderr
naming the path or key, exit code 2 (--debug shows the traceback). The library part is
`mogan_ds.sampling.generate`.
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
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--generator", help="diffusers WanTransformer3DModel folder of the few-step generator")
    src.add_argument("--checkpoint", help="run dir or export dir holding the generator in diffusers format (see above)")
    ap.add_argument(
        "--config", help="recipe YAML or shipped recipe name (default: the run's config.yaml with --checkpoint)"
    )
    pr = ap.add_mutually_exclusive_group(required=True)
    pr.add_argument("--prompts", help="text file, one prompt per line (or .jsonl with 'prompt')")
    pr.add_argument("--prompt-embeds", dest="prompt_embeds", help="torch file {'embeds': [N,L,D], 'prompts': [...]}")
    ap.add_argument("--out", required=True, help="output directory for the mp4 files and samples.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--teacher", action="store_true", help="sample the teacher (models.root/transformer) with multi-step CFG"
    )
    ap.add_argument(
        "--negative-prompt",
        dest="negative_prompt",
        default=None,
        help="teacher's unconditional prompt (default: the config's text.negative_prompt, Wan's standard one; '' = empty)",
    )
    ap.add_argument("--batch-size", dest="batch_size", type=int, default=1, help="prompts per network call")
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ap.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="transformer/text encoder dtype (auto: bf16 on CUDA, fp32 on CPU)",
    )
    add_generation_tail(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
    with user_errors(args.debug, "sample.py") as outcome:
        from mogan_ds.sampling.generate import generate_samples

        kwargs = {k: v for k, v in vars(args).items() if k != "debug"}
        kwargs["device"] = kwargs["device"] or default_device()
        generate_samples(**kwargs)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
