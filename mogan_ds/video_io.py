"""mp4 files for rendered samples: the PyAV encoder/decoder of `mogan_ds.data.video`,
plus what a sample writer needs on top (any frame size, no half-written files)."""

from __future__ import annotations

import os

import numpy as np
import torch

from .data.video import iter_frames, probe_video
from .data.video import write_mp4 as _encode_mp4


def write_mp4(path: str | os.PathLike, frames, fps: float, crf: int = 18, preset: str = "veryfast") -> None:
    """Write uint8 RGB frames [F, H, W, 3] (numpy or torch) as H.264 (libx264, yuv420p).

    yuv420p subsamples chroma 2x2, so an odd H or W is padded by repeating the last
    row/column rather than refused (decoded VAE frames of odd sizes still get written).
    The file goes to `<path>.tmp` first and is renamed, so an interrupted run never leaves
    a truncated mp4 that looks finished. x264 is deterministic for identical frames and
    settings on one machine.
    """
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8:
        raise TypeError(f"write_mp4 expects uint8 frames, got {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"write_mp4 expects frames [F, H, W, 3] with F >= 1, got {arr.shape}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    pad_h, pad_w = arr.shape[1] % 2, arr.shape[2] % 2
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            _encode_mp4(fh, np.ascontiguousarray(arr), fps, codec="libx264", crf=crf, preset=preset, pix_fmt="yuv420p")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """All frames of a video as uint8 RGB [F, H, W, 3], and its frame rate."""
    frames = list(iter_frames(path))
    if not frames:
        raise ValueError(f"{path}: no video frames decoded")
    return np.stack(frames), probe_video(path).fps
