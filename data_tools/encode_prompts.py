"""Encode a prompt file into embedding shards once, so training never loads the text encoder.

    python data_tools/encode_prompts.py --prompts prompts.txt \
        --text-encoder Wan2.1-T2V-1.3B-Diffusers/text_encoder \
        --tokenizer Wan2.1-T2V-1.3B-Diffusers/tokenizer --max-length 512 --out prompts_emb/

Prompts: a .txt file (one prompt per non-empty line) or a .jsonl file whose rows carry
``prompt`` (or ``caption`` / ``text``). Embeddings are WanPipeline's (tokenize to
--max-length with padding, UMT5 last hidden state, zeros past the prompt; see
mogan_ds/data/prompts.py), stored trimmed to each prompt's length. Also written to
special.npz: the teacher's CFG negative prompt (Wan's standard negative prompt unless
--negative-prompt or --empty-negative-prompt; recorded in meta.json and checked against
the recipe's text.negative_prompt at training start) and the discriminator's fixed
prompt (--disc-prompt). Re-running with the same inputs is a no-op.
The work is done by `mogan_ds.data.prompts.encode_prompt_folder`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mogan_ds.cli.errors import add_debug_flag, user_errors
from mogan_ds.data.prompts import encode_prompt_folder, read_prompts
from mogan_ds.data.shard_build import ManifestError
from mogan_ds.data.wan_prompts import WAN_NEGATIVE_PROMPT
from mogan_ds.models.builders import DTYPES


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="prompt file (.txt or .jsonl)")
    ap.add_argument("--text-encoder", required=True, help="UMT5 encoder folder (<wan>/text_encoder)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder (<wan>/tokenizer)")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per prompt (the recipe's text.max_length)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument(
        "--disc-prompt", default="a video with good motion", help="the discriminator's fixed prompt (text.disc_prompt)"
    )
    neg = ap.add_mutually_exclusive_group()
    neg.add_argument(
        "--negative-prompt",
        default=WAN_NEGATIVE_PROMPT,
        help="CFG negative prompt (the recipe's text.negative_prompt; default: Wan's standard negative prompt)",
    )
    neg.add_argument(
        "--empty-negative-prompt",
        action="store_true",
        help="use the empty prompt as the CFG negative (diffusers' WanPipeline default)",
    )
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per encoder call")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="encoder precision (Wan pipelines run it in bf16)"
    )
    ap.add_argument(
        "--store-dtype", choices=["fp32", "fp16"], default="fp32", help="storage precision of the embeddings"
    )
    ap.add_argument("--prompts-per-shard", type=int, default=1000)
    ap.add_argument("--overwrite", action="store_true", help="re-encode even if the folder is up to date")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    # a missing or malformed prompt file, missing encoder weights: one line, exit 2
    with user_errors(args.debug, ap.prog) as outcome:
        prompts = read_prompts(args.prompts)
        if not prompts:
            raise ManifestError(f"{args.prompts}: no prompts")
        return encode_prompt_folder(
            prompts,
            args.text_encoder,
            args.tokenizer,
            args.out,
            max_length=args.max_length,
            negative_prompt="" if args.empty_negative_prompt else args.negative_prompt,
            disc_prompt=args.disc_prompt,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            store_dtype=args.store_dtype,
            prompts_per_shard=args.prompts_per_shard,
            overwrite=args.overwrite,
        )
    sys.exit(outcome.exit_code)


if __name__ == "__main__":
    main()
