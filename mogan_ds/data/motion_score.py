"""Motion scores of whole videos, for the shard builder's motion filter and the synthetic corpus.

Both scores are mean motion in pixels per frame (at the clip's target fps), measured on
frames scaled to a 256-pixel short side, so that thresholds mean the same thing for
either method and any source resolution:

* `framediff_motion`: a cheap normal-flow estimate from frame differences (no weights);
* `RaftScorer`: mean RAFT flow magnitude through `mogan_ds.motion.flow.RaftFlow`, the
  same frozen RAFT wrapper the discriminator's motion path uses (weights loaded by
  `mogan_ds.models.builders.load_raft`, as in training).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..models.builders import load_raft
from ..motion.flow import RaftFlow
from .video import ClipTooShortError, Source, iter_frames, probe_video, to_unit

MOTION_SHORT_SIDE = 256
FRAMEDIFF_SHORT_SIDE = 128  # the cheap score works on small frames; the result is rescaled to 256


def analysis_size(height: int, width: int, short_side: int, multiple: int = 2) -> tuple[int, int]:
    """(h, w) with the given short side, the aspect ratio kept, rounded to `multiple`."""
    scale = short_side / min(height, width)
    return (
        max(multiple, int(round(height * scale / multiple)) * multiple),
        max(multiple, int(round(width * scale / multiple)) * multiple),
    )


def _box3(y: np.ndarray) -> np.ndarray:
    """3x3 box blur of [T, H, W] (edges replicated): widens the range the gradient sees."""
    p = np.pad(y, ((0, 0), (1, 1), (1, 1)), mode="edge")
    r = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    return (r[:, :, :-2] + r[:, :, 1:-1] + r[:, :, 2:]) / 9.0


def framediff_motion(frames: np.ndarray) -> float:
    """Cheap motion score of uint8 frames [T, H, W, 3]: normal-flow speed in px/frame.

    Brightness constancy gives |dI/dt| = |v_n| |grad I| at an edge moving with normal
    speed v_n, so sum(|dI/dt| |grad I|) / sum(|grad I|^2) estimates the mean speed, unlike
    a plain mean frame difference, which also grows with texture and contrast. Valid for
    displacements up to a few pixels at the analysis size (it under-reads faster motion,
    which still scores high); 0 for a static or blank clip. Over edges of all
    orientations the normal speed averages 2/pi of the speed, hence the pi/2.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] < 2:
        raise ValueError(f"need frames [T >= 2, H, W, 3], got {frames.shape}")
    y = _box3(frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    it = (y[1:] - y[:-1])[:, 1:-1, 1:-1]
    m = 0.5 * (y[1:] + y[:-1])
    gx = 0.5 * (m[:, 1:-1, 2:] - m[:, 1:-1, :-2])
    gy = 0.5 * (m[:, 2:, 1:-1] - m[:, :-2, 1:-1])
    g = np.sqrt(gx * gx + gy * gy)
    speed = float((np.abs(it) * g).sum() / ((g * g).sum() + 1e-3))
    return speed * (math.pi / 2) * MOTION_SHORT_SIDE / min(frames.shape[1], frames.shape[2])


class RaftScorer:
    """Mean RAFT flow magnitude between consecutive frames (px/frame at a 256-px short side).

    Frames are scaled to a 256-pixel short side with H, W multiples of 8, so `RaftFlow`
    runs them at that size without resizing again. `pairs_per_chunk` bounds memory as
    in training; no gradients, so no activation checkpointing.
    """

    def __init__(
        self, weights: str, arch: str = "raft_large", device: str = "cpu", iters: int = 12, pairs_per_chunk: int = 8
    ):
        self.device = torch.device(device)
        self.flow = RaftFlow(
            load_raft(weights, arch), num_iters=iters, pairs_per_chunk=pairs_per_chunk, checkpoint=False
        ).to(self.device)

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        return analysis_size(height, width, MOTION_SHORT_SIDE, multiple=8)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> float:
        """frames: uint8 [T, h, w, 3] already at `size_for` the source (T >= 2)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[0] < 2 or frames.shape[1] % 8 or frames.shape[2] % 8:
            raise ValueError(f"need frames [T >= 2, H, W, 3] with H, W multiples of 8, got {frames.shape}")
        clip = to_unit(frames).to(self.device).permute(3, 0, 1, 2).unsqueeze(0)  # [1, 3, T, h, w]
        flow = self.flow(clip)  # [1, 2, T-1, h, w] in pixels of this size
        speed = float(flow.float().norm(dim=1).mean())
        return speed * MOTION_SHORT_SIDE / min(frames.shape[1], frames.shape[2])


def motion_score(
    src: Source, fps: float, max_frames: int = 64, raft: RaftScorer | None = None, threads: int = 1
) -> float:
    """Motion score of a video over its first `max_frames` frames at `fps` (see above).

    RAFT when a `RaftScorer` is given, the frame-difference estimate otherwise.
    Raises VideoDecodeError for unreadable input and ClipTooShortError below 2 frames.
    """
    info = probe_video(src)
    if raft is not None:
        h, w = raft.size_for(info.height, info.width)
    else:
        h, w = analysis_size(info.height, info.width, FRAMEDIFF_SHORT_SIDE)
    frames = list(iter_frames(src, fps=fps, height=h, width=w, max_frames=max_frames, threads=threads))
    if len(frames) < 2:
        raise ClipTooShortError(f"{len(frames)} frame(s) at {fps} fps: no motion to measure")
    frames = np.stack(frames)
    return raft(frames) if raft is not None else framediff_motion(frames)
