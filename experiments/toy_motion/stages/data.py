"""Stage 1: the synthetic corpus (train and held-out clips with their ground truth), the tiny
text models and the trainer's prompt folder."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
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
    splits = [
        ("train", r["train_clips"], r["shards"], r["seed"]),
        ("heldout", r["heldout_clips"], 1, r["seed"] + HELDOUT_SEED_OFFSET),
    ]
    if r.get("parallel_shards"):
        # The gpu scale's corpus: every training shard rendered by its own process from its own
        # seed (seed + 1 + shard: another corpus than the sequential one of the same size), on
        # the machine's cores. The held-out split stays the sequential one: the same captions
        # and clips as every CPU run.
        parallel_train(d, r, exp.echo)
        splits = splits[1:]
    for split, n, shards, seed in splits:
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


def _shard(args: tuple) -> None:
    out, n, frames, size, fps, seed, world = args
    write_synthetic_corpus(out, num_clips=n, frames=frames, size=size, fps=fps, shards=1, seed=seed, world=world)


def parallel_train(d: Path, r: dict, echo=print) -> None:
    """The training split as r["shards"] shards rendered in parallel (one process per shard, at
    most the machine's cores), shard s from seed r["seed"] + 1 + s, gathered into d/train with
    the captions in d/train.txt in shard order."""
    import multiprocessing
    import os
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    out = d / "train"
    if (out / "parallel.json").is_file():
        return
    bounds = np.linspace(0, r["train_clips"], r["shards"] + 1).round().astype(int)
    size = (r["size"], r["size"])
    jobs = [
        (
            str(d / "train_parts" / f"{s:06d}"),
            int(bounds[s + 1] - bounds[s]),
            r["frames"],
            size,
            r["fps"],
            r["seed"] + 1 + s,
            r.get("world"),
        )
        for s in range(r["shards"])
    ]
    # spawned, not forked: the parent holds torch's threads, which a forked child can deadlock on
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1), mp_context=ctx) as pool:
        list(pool.map(_shard, jobs))
    out.mkdir(parents=True, exist_ok=True)
    captions = []
    for s, job in enumerate(jobs):
        part = Path(job[0])
        os.replace(part / "000000.tar", out / f"{s:06d}.tar")
        with tarfile.open(out / f"{s:06d}.tar") as tf:
            metas = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".json")}
        captions += [json.loads(metas[k])["caption"] for k in sorted(metas)]
    shutil.rmtree(d / "train_parts")
    (d / "train.txt").write_text("\n".join(captions) + "\n")
    (out / "parallel.json").write_text(json.dumps({"shards": len(jobs), "clips": r["train_clips"]}))
    echo(f"[toy] data: {r['train_clips']} training clips in {len(jobs)} shards rendered in parallel")
