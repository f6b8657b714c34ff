"""Encode a prompt file into embedding shards once, so training never loads the text encoder.

    python data_tools/encode_prompts.py --prompts prompts.txt \
        --text-encoder Wan2.1-T2V-1.3B-Diffusers/text_encoder \
        --tokenizer Wan2.1-T2V-1.3B-Diffusers/tokenizer --max-length 512 --out prompts_emb/

Prompts: a .txt file (one prompt per non-empty line) or a .jsonl file whose rows carry
``prompt`` (or ``caption`` / ``text``). Embeddings are WanPipeline's (tokenize to
--max-length with padding, UMT5 last hidden state, zeros past the prompt; see
mogan_ds/data/prompts.py), stored trimmed to each prompt's length. Also written: the
empty prompt (the CFG negative, or --negative-prompt) and the discriminator's fixed
prompt (--disc-prompt) in special.npz. Re-running with the same inputs is a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import time

import numpy as np
import torch

from mogan_ds.data.prompts import encode_texts
from mogan_ds.data.shards import write_tar_atomic
from mogan_ds.models.builders import DTYPES, load_text_encoder, load_tokenizer


def read_prompts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        if path.lower().endswith(".jsonl"):
            out = []
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                text = next((row[k] for k in ("prompt", "caption", "text") if isinstance(row.get(k), str)), None)
                if text is None:
                    raise SystemExit(f"{path}:{n}: no 'prompt', 'caption' or 'text' string field")
                out.append(text)
            return out
        return [line.strip() for line in fh if line.strip()]


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="prompt file (.txt or .jsonl)")
    ap.add_argument("--text-encoder", required=True, help="UMT5 encoder folder (<wan>/text_encoder)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder (<wan>/tokenizer)")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per prompt (the recipe's text.max_length)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--disc-prompt", default="a video with good motion", help="the discriminator's fixed prompt (text.disc_prompt)")
    ap.add_argument("--negative-prompt", default="", help="CFG negative prompt (Wan's default: the empty prompt)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per encoder call")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="encoder precision (Wan pipelines run it in bf16)")
    ap.add_argument("--store-dtype", choices=["fp32", "fp16"], default="fp32", help="storage precision of the embeddings")
    ap.add_argument("--prompts-per-shard", type=int, default=1000)
    ap.add_argument("--overwrite", action="store_true", help="re-encode even if the folder is up to date")
    args = ap.parse_args(argv)

    prompts = read_prompts(args.prompts)
    if not prompts:
        raise SystemExit(f"{args.prompts}: no prompts")
    ident = {
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "text_encoder": os.path.abspath(args.text_encoder),
        "max_length": args.max_length,
        "disc_prompt": args.disc_prompt,
        "negative_prompt": args.negative_prompt,
        "dtype": args.dtype,
        "store_dtype": args.store_dtype,
    }
    meta_path = os.path.join(args.out, "meta.json")
    if os.path.exists(meta_path) and not args.overwrite:
        with open(meta_path) as fh:
            meta = json.load(fh)
        if meta.get("identity") == ident:
            print(f"{args.out} is up to date ({meta['num_prompts']} prompts)")
            return meta
    os.makedirs(args.out, exist_ok=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # meta.json last: its presence marks a complete folder

    t0 = time.time()
    device = torch.device(args.device)
    tokenizer = load_tokenizer(args.tokenizer)
    encoder = load_text_encoder(args.text_encoder, dtype=DTYPES[args.dtype]).to(device)
    store = np.float16 if args.store_dtype == "fp16" else np.float32

    def encode(texts):
        return [e.numpy().astype(store) for e in encode_texts(texts, tokenizer, encoder, args.max_length, device)]

    neg, disc = encode([args.negative_prompt, args.disc_prompt])
    dim = int(neg.shape[1])
    special = io.BytesIO()
    np.savez(special, negative=neg, disc=disc)
    with open(os.path.join(args.out, "special.npz"), "wb") as fh:
        fh.write(special.getvalue())

    shards, truncated = [], 0
    for s, start in enumerate(range(0, len(prompts), args.prompts_per_shard)):
        chunk = prompts[start : start + args.prompts_per_shard]
        samples = []
        for b in range(0, len(chunk), args.batch_size):
            texts = chunk[b : b + args.batch_size]
            for i, (text, emb) in enumerate(zip(texts, encode(texts))):
                truncated += emb.shape[0] == args.max_length
                samples.append({"__key__": f"{start + b + i:08d}", "npy": _npy(emb), "txt": text.encode("utf-8")})
        name = f"prompts-{s:06d}.tar"
        write_tar_atomic(os.path.join(args.out, name), samples)
        shards.append(name)
    meta = {
        "num_prompts": len(prompts),
        "max_length": args.max_length,
        "dim": dim,
        "shards": shards,
        "special": "special.npz",
        "truncated_prompts": int(truncated),
        "identity": ident,
    }
    with open(meta_path + ".tmp", "w") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    print(f"encoded {len(prompts)} prompts (dim {dim}, max_length {args.max_length}, {truncated} at the limit) into {len(shards)} shards in {args.out} in {time.time() - t0:.1f} s")
    return meta


if __name__ == "__main__":
    main()
