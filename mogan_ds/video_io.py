"""mp4 in and out with PyAV (torchvision.io's video functions are gone in 0.29)."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import torch


def _as_uint8_frames(frames) -> np.ndarray:
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8:
        raise TypeError(f"write_mp4 expects uint8 frames, got {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"write_mp4 expects frames [F, H, W, 3] with F >= 1, got {arr.shape}")
    return np.ascontiguousarray(arr)


def write_mp4(path: str | os.PathLike, frames, fps: float, crf: int = 18, preset: str = "medium") -> None:
    """Write uint8 RGB frames [F, H, W, 3] to an H.264 (libx264, yuv420p) mp4.

    yuv420p subsamples chroma 2x2, so H and W must be even: an odd size is padded by
    repeating the last row/column (players cannot show odd yuv420p frames). The file is
    written to `<path>.tmp` and renamed, so a crash never leaves a truncated mp4 behind.
    Encoding is deterministic for identical frames and settings on one machine.
    """
    import av

    arr = _as_uint8_frames(frames)
    _, h, w, _ = arr.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = os.fspath(path)
    tmp = path + ".tmp"
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(crf)), "preset": preset}
        for frame in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed (B-)frames
            container.mux(packet)
    os.replace(tmp, path)


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """All frames of a video as uint8 RGB [F, H, W, 3], and its average frame rate."""
    import av

    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path}: no video frames decoded")
    return np.stack(frames), fps
