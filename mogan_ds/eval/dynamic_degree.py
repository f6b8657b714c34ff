"""Dynamics degree, as VBench computes it (vbench/dynamic_degree.py, v0.1.5).

Per video (`DynamicDegree.infer` / `get_frames` / `set_params` / `get_score` / `check_move`):

1. frames are read at every `max(1, round(fps / 8))`-th index (`frame_interval`);
2. each consecutive pair of the sampled frames, replicate-padded to multiples of 8 and
   centred as RAFT's ``InputPadder(mode="sintel")`` does, gets RAFT flow at 20 refinement
   iterations (the last, upsampled flow);
3. a pair's score is the mean of its largest 5% flow magnitudes, ``int(h * w * 0.05)``
   pixels of the *padded* flow (`top5_mean_magnitude`);
4. the video is dynamic when at least ``round(4 * n / 16)`` pairs score above
   ``6.0 * min(H, W) / 256`` (H, W of the unpadded frame, n the number of sampled
   frames) (`dynamic_params`, `is_dynamic`).

The metric over a set of videos (`dynamic_degree`) is the fraction of dynamic videos.
RAFT is torchvision's raft_large loaded from VBench's raft-things.pth through
`raft_keys` (bit-identical flow to the original network on the same weights). Frames go
in as VBench feeds them: float RGB in [0, 255], normalised to [-1, 1] by the same
``2 * (x / 255) - 1`` the original RAFT applies internally. Python's `round` (half to
even) is the rule's own rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# (frames1, frames2) float [P, 3, H, W] in [0, 255], H and W multiples of 8 -> flow [P, 2, H, W] in pixels.
FlowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

RAFT_ITERS = 20
TOP_FRACTION = 0.05


def frame_interval(fps: float) -> int:
    """`DynamicDegree.get_frames`: every max(1, round(fps / 8))-th frame is kept."""
    return max(1, round(fps / 8))


def sample_frames(frames: np.ndarray, fps: float) -> np.ndarray:
    return frames[:: frame_interval(fps)]


def dynamic_params(height: int, width: int, num_frames: int) -> tuple[float, int]:
    """`DynamicDegree.set_params`: (threshold in pixels, number of pairs that must exceed it)."""
    return 6.0 * (min(height, width) / 256.0), round(4 * (num_frames / 16.0))


def sintel_padding(height: int, width: int, divisor: int = 8) -> list[int]:
    """RAFT's `InputPadder` (mode "sintel"): [left, right, top, bottom] to the next multiple of 8, centred."""
    pad_h = (((height // divisor) + 1) * divisor - height) % divisor
    pad_w = (((width // divisor) + 1) * divisor - width) % divisor
    return [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]


def top5_mean_magnitude(flow: torch.Tensor | np.ndarray) -> float:
    """`DynamicDegree.get_score`: mean of the int(h*w*0.05) largest magnitudes of a [2, H, W] flow.

    Fewer than 20 pixels give no top 5% (VBench's mean of nothing, NaN, which never
    exceeds a threshold)."""
    flow = torch.as_tensor(flow, dtype=torch.float32)
    rad = torch.sqrt(flow[0] ** 2 + flow[1] ** 2).flatten()
    k = int(rad.numel() * TOP_FRACTION)
    if k == 0:
        return math.nan
    return float(torch.topk(rad, k).values.double().mean())


def is_dynamic(pair_scores: Sequence[float], threshold: float, count_num: int) -> bool:
    """`DynamicDegree.check_move`: some prefix of the pairs has `count_num` scores strictly above `threshold`.

    As VBench's loop, a video with at least one pair and count_num 0 is dynamic, and a
    video with no pairs is not."""
    count = 0
    for s in pair_scores:
        if s > threshold:
            count += 1
        if count >= count_num:
            return True
    return False


@dataclass
class DynamicResult:
    dynamic: bool
    pair_scores: list[float]
    threshold: float
    count_num: int
    num_frames: int

    def to_json(self) -> dict:
        return {
            "dynamic": self.dynamic,
            "pair_scores": [round(s, 4) for s in self.pair_scores],
            "threshold": self.threshold,
            "count_num": self.count_num,
            "sampled_frames": self.num_frames,
        }


def raft_flow_fn(raft: torch.nn.Module, iters: int = RAFT_ITERS) -> FlowFn:
    """Flow of a torchvision RAFT fed as the original RAFT is: [0, 255] frames -> 2 * (x / 255) - 1."""

    def flow(img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        return raft(2 * (img1 / 255.0) - 1.0, 2 * (img2 / 255.0) - 1.0, num_flow_updates=iters)[-1]

    return flow


class DynamicDegree:
    """Per-video dynamics of VBench's rule on any flow function (RAFT in use; a known-flow stand-in in tests)."""

    def __init__(self, flow_fn: FlowFn, device: str | torch.device = "cpu", pairs_per_batch: int = 4):
        self.flow_fn = flow_fn
        self.device = torch.device(device)
        # VBench runs one pair per call; batching pairs changes nothing (per-sample
        # InstanceNorm, eval-mode BatchNorm) but the speed.
        self.pairs_per_batch = max(1, pairs_per_batch)

    @torch.no_grad()
    def video(self, frames: np.ndarray, fps: float) -> DynamicResult:
        """`DynamicDegree.infer` on uint8 RGB frames [T, H, W, 3] at `fps` (T >= 1).

        A clip without frames is refused, as VBench refuses it (`get_frames` asserts it read
        one); a single frame gives no pairs and is not dynamic, as in VBench."""
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise ValueError(f"dynamics degree needs frames [T >= 1, H, W, 3], got shape {tuple(frames.shape)}")
        frames = sample_frames(frames, fps)
        n, h, w = frames.shape[0], frames.shape[1], frames.shape[2]
        threshold, count_num = dynamic_params(h, w, n)
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        pad = sintel_padding(h, w)
        scores: list[float] = []
        for i in range(0, n - 1, self.pairs_per_batch):
            j = min(i + self.pairs_per_batch, n - 1)
            a = F.pad(x[i:j].to(self.device), pad, mode="replicate")
            b = F.pad(x[i + 1 : j + 1].to(self.device), pad, mode="replicate")
            flow = self.flow_fn(a, b).float().cpu()
            scores.extend(top5_mean_magnitude(f) for f in flow)
        return DynamicResult(is_dynamic(scores, threshold, count_num), scores, threshold, count_num, n)


def dynamic_degree(flags: Sequence[bool]) -> float:
    """`dynamic_degree`: the fraction of dynamic videos."""
    if not flags:
        return math.nan
    return float(np.mean([bool(f) for f in flags]))
