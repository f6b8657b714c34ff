"""Prompt embeddings: encoding (offline, data_tools/encode_prompts.py) and the training stream.

Embeddings are made exactly as diffusers' ``WanPipeline._get_t5_prompt_embeds`` makes
them: the cleaned prompt is tokenized to ``max_length`` with padding, the UMT5 encoder's
last hidden state is taken with the attention mask, and positions past the prompt's
true token count are zero. Shards store only the true-length rows (``[len, D]`` .npy),
which for Wan's 512-token context is ~20x smaller; the loader pads them back.

Layout of an embedding folder (local path or URL prefix)::

    meta.json             max_length, dim, dtype, shards, counts, encoder, prompts hash
    special.npz           negative (empty prompt, the CFG negative), disc (the
                          discriminator's fixed prompt), each [1, L, D]
    prompts-NNNNNN.tar    samples KKKKKKKK.npy ([len, D]) + KKKKKKKK.txt (the prompt)
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter

import numpy as np
import torch
import webdataset as wds

from .shards import resumable_samples, shards_fingerprint, slot_split

log = logging.getLogger(__name__)
_TAG_PROMPTS = 0x9A0B


def clean_prompt(text: str) -> str:
    """Wan's own prompt cleaning (ftfy when installed, html unescape, whitespace)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)


@torch.no_grad()
def encode_texts(texts: list[str], tokenizer, text_encoder, max_length: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
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
        raise FileNotFoundError(f"prompt embeddings: no readable meta.json in {path} (written by data_tools/encode_prompts.py): {exc}") from exc
    return meta


def load_special_embeddings(path: str) -> dict[str, torch.Tensor]:
    """{"negative": [1, L, D], "disc": [1, L, D]} float32 from an embedding folder.

    negative: the empty prompt (the CFG negative, as WanPipeline encodes ``""``); disc:
    the discriminator's fixed prompt (``--disc-prompt`` of encode_prompts.py).
    """
    meta = read_meta(path)
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
        self._identity = {"shards": shards_fingerprint(self.urls), "seed": seed, "dp_rank": dp_rank, "dp_size": dp_size, "batch_size": batch_size, "shuffle_buffer": shuffle_buffer}
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
                yield {"embeds": torch.stack([b[2] for b in batch]), "prompt": [b[1] for b in batch], "key": [b[0] for b in batch]}
                batch = []

    def state_dict(self) -> dict:
        return {"identity": dict(self._identity), "cursor": list(self._cursor), "stats": dict(self._stats), "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        diff = {k: (state.get("identity", {}).get(k), v) for k, v in self._identity.items() if state.get("identity", {}).get(k) != v}
        if diff:
            raise ValueError("prompt state was saved for another stream; (saved, now) differ in " + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items()))
        self._cursor, self._stats, self._batches = list(state["cursor"]), Counter(state["stats"]), int(state["batches"])

    def stats(self) -> dict:
        return {**self._stats, "batches": self._batches}

    def __repr__(self) -> str:
        return f"PromptEmbeddings({self.path!r}, {self.meta.get('num_prompts')} prompts, L={self.max_length}, D={self.dim})"

