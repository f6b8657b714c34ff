"""Stage 1: the synthetic corpus (train and held-out clips with their ground truth), the tiny
text models and the trainer's prompt folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mogan_ds.data.synthetic import write_synthetic_corpus

from ..measure import true_flow

if TYPE_CHECKING:
    from ..workdir import WorkFolder

HELDOUT_SEED_OFFSET = 1000


def run(exp: WorkFolder, r: dict) -> dict:
    from mogan_ds.data.prompts import encode_prompt_folder
    from mogan_ds.models.tiny import write_tiny_models

    d = exp.dir("data")
    tiny = write_tiny_models(d / "tiny", seed=r["text_seed"])
    size = (r["size"], r["size"])
    for split, n, shards, seed in (
        ("train", r["train_clips"], r["shards"], r["seed"]),
        ("heldout", r["heldout_clips"], 1, r["seed"] + HELDOUT_SEED_OFFSET),
    ):
        write_synthetic_corpus(
            str(d / split),
            num_clips=n,
            frames=r["frames"],
            size=size,
            fps=r["fps"],
            shards=shards,
            seed=seed,
            prompts=str(d / f"{split}.txt"),
            echo=exp.echo,
            world=r.get("world"),
        )
    captions = (d / "train.txt").read_text().splitlines()
    encode_prompt_folder(
        captions,
        str(tiny / "wan" / "text_encoder"),
        str(tiny / "wan" / "tokenizer"),
        str(d / "prompts"),
        max_length=r["max_length"],
        echo=exp.echo,
    )
    metas = [m for _, m in exp.clips("heldout")] + [m for _, m in exp.clips("train")]
    words = {w: sum(w in m["caption"] for m in metas) for w in ("slowly", "steadily", "quickly", "static")}
    flows = [true_flow(m, 0).norm(dim=0) for m in metas]
    return {
        "train_clips": r["train_clips"],
        "heldout_clips": r["heldout_clips"],
        "caption_speed_words": words,
        "object_speed_px_per_frame": [min(m["speed"] for m in metas), max(m["speed"] for m in metas)],
        "world": r.get("world") or "default",
        "mean_true_flow_magnitude": round(float(np.mean([float(f.mean()) for f in flows])), 4),
        # Pixels moving by more than half a pixel (frame 0 -> 1): the share zero flow gets wrong.
        "moving_pixel_fraction": round(float(np.mean([float((f > 0.5).float().mean()) for f in flows])), 4),
    }
