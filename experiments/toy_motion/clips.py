"""Stage 1's clips as the later stages read them: shard folders to frames and ground truth,
windows of frames to tensors, and those to VAE latents."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import torch

from mogan_ds.data.video import read_mp4

from .measure import to_unit


def load_clips(folder: Path) -> list[tuple[np.ndarray, dict]]:
    """Every clip of a shard folder, in key order: (uint8 [F, H, W, 3], its metadata with the ground truth)."""
    out = []
    for tar in sorted(folder.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for key in sorted(members):
            frames, _ = read_mp4(members[key]["mp4"])
            out.append((frames, json.loads(members[key]["json"])))
    return out


def clip_window(clip: np.ndarray, start: int, frames: int) -> torch.Tensor:
    """Frames start .. start + frames - 1 of a uint8 clip [F, H, W, 3] as the VAE takes them: [3, F, H, W] in [-1, 1]."""
    return to_unit(clip[start : start + frames]).transpose(0, 1)


def encode_mode(vae, xs: list[torch.Tensor], batch: int = 8) -> torch.Tensor:
    """Posterior means of clips [3, F, H, W] in [-1, 1] -> [N, 16, T, h, w], encoded `batch` at a time.

    Batched encoding equals one clip at a time (convolutions and per-frame attention work per
    sample; measured max difference 1e-6) and is ~2.5x faster on the CPU.
    """
    dev = next(vae.parameters()).device  # fp32, no autocast: these latents are the teacher's data
    return torch.cat(
        [vae.encode(torch.stack(xs[i : i + batch]).to(dev)).latent_dist.mode() for i in range(0, len(xs), batch)]
    )
