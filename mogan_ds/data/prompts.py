"""Prompt embeddings: offline encoding (`encode_prompt_folder`, data_tools/encode_prompts.py) and the training stream.

Embeddings are made exactly as diffusers' ``WanPipeline._get_t5_prompt_embeds`` makes
them: the cleaned prompt is tokenized to ``max_length`` with padding, the UMT5 encoder's
last hidden state is taken with the attention mask, and positions past the prompt's
true token count are zero. Shards store only the true-length rows (``[len, D]`` .npy),
which for Wan's 512-token context is ~20x smaller; the loader pads them back.

Layout of an embedding folder (local path or URL prefix)::

    meta.json             max_length, dim, shards, counts, negative_prompt, disc_prompt,
                          identity (encoder, dtypes, prompts hash)
    special.npz           negative (the teacher's CFG negative prompt, by default Wan's
                          standard one), disc (the discriminator's fixed prompt), each [1, L, D]
    prompts-NNNNNN.tar    samples KKKKKKKK.npy ([len, D]) + KKKKKKKK.txt (the prompt)

The negative prompt is fixed when the folder is written, so the trainer checks it
against the recipe's ``text.negative_prompt`` (`load_special_embeddings`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections import Counter

import numpy as np
import torch
import webdataset as wds

from ..errors import BadFileError
from ..models.builders import DTYPES, load_text_encoder, load_tokenizer
from .records import completed_record
from .shard_build import ManifestError, write_tar_atomic
from .streaming import resumable_samples, shards_fingerprint, slot_split
from .wan_prompts import WAN_NEGATIVE_PROMPT

log = logging.getLogger(__name__)
_TAG_PROMPTS = 0x9A0B


class NegativePromptMismatchError(BadFileError):
    """An embedding folder was encoded with another CFG negative prompt than the recipe's."""


def clean_prompt(text: str) -> str:
    """Wan's own prompt cleaning (ftfy when installed, html unescape, whitespace)."""
    # Lazy: importing diffusers' Wan pipeline takes seconds, and only offline encoding
    # needs it; the trainer and its loader workers import this module for the stream.
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)


@torch.no_grad()
def encode_texts(
    texts: list[str], tokenizer, text_encoder, max_length: int, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """UMT5 embeddings of `texts`, each trimmed to its true length: list of [len_i, D] float32.

    Padding them with zeros to `max_length` gives WanPipeline._get_t5_prompt_embeds.
    """
    inputs = tokenizer(
        [clean_prompt(t) for t in texts],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state.float().cpu()
    lens = mask.gt(0).sum(dim=1).cpu()
    return [h[: int(n)] for h, n in zip(hidden, lens)]


def pad_embedding(e: np.ndarray | torch.Tensor, max_length: int) -> torch.Tensor:
    """[len, D] -> [max_length, D] float32, zeros past len (Wan's convention)."""
    e = torch.as_tensor(np.asarray(e, dtype=np.float32))
    out = e.new_zeros(max_length, e.shape[-1])
    out[: e.shape[0]] = e[:max_length]
    return out


def _read(url: str) -> bytes:
    with wds.gopen(url, "rb") as fh:
        return fh.read()


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def read_meta(path: str) -> dict:
    try:
        meta = json.loads(_read(_join(str(path), "meta.json")))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"prompt embeddings: no readable meta.json in {path} (written by data_tools/encode_prompts.py): {exc}"
        ) from exc
    return meta


def stored_negative_prompt(meta: dict) -> str | None:
    """The CFG negative prompt an embedding folder was encoded with (None: not recorded)."""
    if isinstance(meta.get("negative_prompt"), str):
        return meta["negative_prompt"]
    # folders written before the prompt was a top-level field keep it in their identity
    return (meta.get("identity") or {}).get("negative_prompt")


def load_special_embeddings(path: str, negative_prompt: str | None = None) -> dict[str, torch.Tensor]:
    """{"negative": [1, L, D], "disc": [1, L, D]} float32 from an embedding folder.

    negative: the teacher's CFG negative prompt (``--negative-prompt`` of
    encode_prompts.py); disc: the discriminator's fixed prompt (``--disc-prompt``).
    With `negative_prompt` (the recipe's ``text.negative_prompt``) the folder must have
    been encoded with exactly that text, else NegativePromptMismatchError names both.
    """
    meta = read_meta(path)
    if negative_prompt is not None:
        stored = stored_negative_prompt(meta)
        if stored != negative_prompt:

            def show(t):
                return (
                    "an unrecorded negative prompt"
                    if t is None
                    else "the empty prompt"
                    if t == ""
                    else "Wan's standard negative prompt"
                    if t == WAN_NEGATIVE_PROMPT
                    else repr(t[:60] + ("..." if len(t) > 60 else ""))
                )

            raise NegativePromptMismatchError(
                f"text.negative_prompt is {show(negative_prompt)}, but the prompt embeddings in {path} (data.prompts) were "
                f"encoded with {show(stored)}: re-encode them (data_tools/encode_prompts.py --negative-prompt ..., or "
                "--empty-negative-prompt) or set text.negative_prompt to the folder's prompt"
            )
    with np.load(io.BytesIO(_read(_join(str(path), meta.get("special", "special.npz"))))) as z:
        return {k: pad_embedding(z[k], meta["max_length"]).unsqueeze(0) for k in ("negative", "disc")}


class PromptEmbeddings:
    """Endless batches ``{"embeds": [B, L, D] float32, "prompt": list[str], "key": list[str]}``.

    Sharded by data-parallel rank (shards dealt to ranks when there are enough, else
    prompts split by position), shuffled in blocks of `shuffle_buffer`, resampled so
    every rank draws forever; deterministic for (seed, dp_rank) and exactly resumable
    through ``state_dict`` / ``load_state_dict`` (same contract as MotionClipStream).
    Reads in the calling process: a prompt embedding is small next to a video clip.
    """

    def __init__(self, path: str, dp_rank: int, dp_size: int, seed: int, batch_size: int, shuffle_buffer: int = 256):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.path = str(path)
        self.meta = read_meta(self.path)
        self.max_length, self.dim = int(self.meta["max_length"]), int(self.meta["dim"])
        self.urls = [_join(self.path, s) for s in self.meta["shards"]]
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.seed_key = (seed, dp_rank, 0, _TAG_PROMPTS)
        self.slot = slot_split(self.urls, dp_rank, dp_size, 0, 1)
        self._identity = {
            "shards": shards_fingerprint(self.urls),
            "seed": seed,
            "dp_rank": dp_rank,
            "dp_size": dp_size,
            "batch_size": batch_size,
            "shuffle_buffer": shuffle_buffer,
        }
        self._cursor = [0, 0, 0, 0]
        self._stats = Counter()
        self._batches = 0

    def __iter__(self):
        stats = Counter(self._stats)
        samples = resumable_samples(self.slot, self.seed_key, self._cursor, self.shuffle_buffer, stats)
        batch = []
        for s in samples:
            try:
                emb = np.load(io.BytesIO(s["npy"]), allow_pickle=False)
                prompt = s["txt"].decode("utf-8")
                if emb.ndim != 2 or emb.shape[1] != self.dim:
                    raise ValueError(f"embedding of shape {emb.shape}, expected [len, {self.dim}]")
            except (KeyError, ValueError, UnicodeDecodeError) as exc:
                stats["skipped_corrupt"] += 1
                log.warning("skipped_corrupt prompt %s/%s: %s", s.get("__url__"), s.get("__key__"), exc)
                continue
            batch.append((s["__key__"], prompt, pad_embedding(emb, self.max_length), s["__cursor__"]))
            if len(batch) == self.batch_size:
                self._cursor, self._stats = list(batch[-1][3]), Counter(stats)
                self._batches += 1
                yield {
                    "embeds": torch.stack([b[2] for b in batch]),
                    "prompt": [b[1] for b in batch],
                    "key": [b[0] for b in batch],
                }
                batch = []

    def state_dict(self) -> dict:
        return {
            "identity": dict(self._identity),
            "cursor": list(self._cursor),
            "stats": dict(self._stats),
            "batches": self._batches,
        }

    def load_state_dict(self, state: dict) -> None:
        diff = {
            k: (state.get("identity", {}).get(k), v)
            for k, v in self._identity.items()
            if state.get("identity", {}).get(k) != v
        }
        if diff:
            raise ValueError(
                "prompt state was saved for another stream; (saved, now) differ in "
                + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
            )
        self._cursor, self._stats, self._batches = list(state["cursor"]), Counter(state["stats"]), int(state["batches"])

    def stats(self) -> dict:
        return {**self._stats, "batches": self._batches}

    def __repr__(self) -> str:
        return f"PromptEmbeddings({self.path!r}, {self.meta.get('num_prompts')} prompts, L={self.max_length}, D={self.dim})"


# --------------------------------------------------------------------------- encoding


def read_prompts(path: str) -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or .jsonl rows with ``prompt``/``caption``/``text``."""
    with open(path, encoding="utf-8") as fh:
        if path.lower().endswith(".jsonl"):
            out = []
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise ManifestError(f"{path}:{n}: not JSON: {exc}") from None
                text = (
                    next((row[k] for k in ("prompt", "caption", "text") if isinstance(row.get(k), str)), None)
                    if isinstance(row, dict)
                    else None
                )
                if text is None:
                    raise ManifestError(f"{path}:{n}: no 'prompt', 'caption' or 'text' string field")
                out.append(text)
            return out
        return [line.strip() for line in fh if line.strip()]


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def encode_prompt_folder(
    prompts: list[str],
    text_encoder: str,
    tokenizer: str,
    out: str,
    max_length: int = 512,
    negative_prompt: str = WAN_NEGATIVE_PROMPT,
    disc_prompt: str = "a video with good motion",
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "fp32",
    store_dtype: str = "fp32",
    prompts_per_shard: int = 1000,
    overwrite: bool = False,
    echo=print,
) -> dict:
    """Encode `prompts` (plus the negative and discriminator prompts) into an embedding folder.

    `text_encoder` / `tokenizer` are the UMT5 folders of a Wan release; `dtype` the
    encoder's precision (Wan pipelines run it in bf16), `store_dtype` the embeddings'
    (fp32 or fp16). A folder already holding exactly these inputs is left as it is
    unless `overwrite`; meta.json is written last, so its presence marks a complete
    folder. Returns the meta.
    """
    if not prompts:
        raise ValueError("no prompts to encode")
    if store_dtype not in ("fp32", "fp16"):
        raise ValueError(f"store_dtype must be fp32 or fp16, got {store_dtype!r}")
    ident = {
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "text_encoder": os.path.abspath(text_encoder),
        "max_length": max_length,
        "disc_prompt": disc_prompt,
        "negative_prompt": negative_prompt,
        "dtype": dtype,
        "store_dtype": store_dtype,
    }
    meta_path = os.path.join(out, "meta.json")
    meta = completed_record(meta_path, "identity", ident, overwrite)
    if meta is not None:
        echo(f"{out} is up to date ({meta['num_prompts']} prompts)")
        return meta
    os.makedirs(out, exist_ok=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # meta.json last: its presence marks a complete folder

    t0 = time.time()
    dev = torch.device(device)
    tok = load_tokenizer(tokenizer)
    encoder = load_text_encoder(text_encoder, dtype=DTYPES[dtype]).to(dev)
    store = np.float16 if store_dtype == "fp16" else np.float32

    def encode(texts):
        return [e.numpy().astype(store) for e in encode_texts(texts, tok, encoder, max_length, dev)]

    neg, disc = encode([negative_prompt, disc_prompt])
    dim = int(neg.shape[1])
    special = io.BytesIO()
    np.savez(special, negative=neg, disc=disc)
    with open(os.path.join(out, "special.npz"), "wb") as fh:
        fh.write(special.getvalue())

    shards, truncated = [], 0
    for s, start in enumerate(range(0, len(prompts), prompts_per_shard)):
        chunk = prompts[start : start + prompts_per_shard]
        samples = []
        for b in range(0, len(chunk), batch_size):
            texts = chunk[b : b + batch_size]
            for i, (text, emb) in enumerate(zip(texts, encode(texts))):
                truncated += emb.shape[0] == max_length
                samples.append({"__key__": f"{start + b + i:08d}", "npy": _npy(emb), "txt": text.encode("utf-8")})
        name = f"prompts-{s:06d}.tar"
        write_tar_atomic(os.path.join(out, name), samples)
        shards.append(name)
    meta = {
        "num_prompts": len(prompts),
        "max_length": max_length,
        "dim": dim,
        "shards": shards,
        "special": "special.npz",
        "negative_prompt": negative_prompt,
        "disc_prompt": disc_prompt,
        "truncated_prompts": int(truncated),
        "identity": ident,
    }
    with open(meta_path + ".tmp", "w") as fh:
        json.dump(meta, fh, indent=1, ensure_ascii=False)
    os.replace(meta_path + ".tmp", meta_path)
    echo(
        f"encoded {len(prompts)} prompts (dim {dim}, max_length {max_length}, {truncated} at the limit) into {len(shards)} shards in {out} in {time.time() - t0:.1f} s"
    )
    return meta
