"""Motion smoothness, as VBench computes it (vbench/motion_smoothness.py, v0.1.5).

`MotionSmoothness.motion_score` on all decoded frames (no fps sampling):

1. keep the even frames 0, 2, 4, ... (`FrameProcess.extract_frame(start_from=0)`), as
   float RGB in [0, 1] (`img2tensor`), replicate-padded to multiples of 16 and centred
   (AMT's `InputPadder`, divisor 16 at scale 1);
2. interpolate each consecutive pair at t = 1/2 with AMT-S (one iteration), unpad, and
   convert back to uint8 by AMT's `tensor2img`: ``(x * 255).clip(0, 255)`` *truncated*
   to uint8;
3. compare the i-th interpolated frame with the real odd frame 2i+1 (`vfi_score`): the
   mean absolute difference over pixels and channels (`cv2.absdiff` + `np.mean`),
   averaged over the interpolated frames;
4. score = (255 - mean difference) / 255; the metric is the mean over videos.

VBench shrinks frames by AMT's `scale_factor` only when a GPU's memory is too small
for the frame size (never on CPU, and scale 1 for 480p on any current datacenter GPU);
this module always runs at scale 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# (frames0, frames1 [P, 3, H, W] in [0, 1], t) -> the frames at time t, [P, 3, H, W] in [0, 1].
Interpolator = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def amt_padding(height: int, width: int, divisor: int = 16) -> list[int]:
    """AMT's `InputPadder`: [left, right, top, bottom] to the next multiple of `divisor`, centred."""
    pad_h = (((height // divisor) + 1) * divisor - height) % divisor
    pad_w = (((width // divisor) + 1) * divisor - width) % divisor
    return [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """AMT's `tensor2img`: [3, H, W] in [0, 1] -> uint8 [H, W, 3], scaled, clipped and truncated (not rounded)."""
    return (x * 255.0).permute(1, 2, 0).cpu().numpy().clip(0, 255).astype(np.uint8)


def vfi_difference(real_odd: Sequence[np.ndarray], interpolated: Sequence[np.ndarray]) -> float:
    """`MotionSmoothness.vfi_score`: mean over interpolated frames of the mean |real - interpolated|."""
    diffs = [
        np.mean(np.abs(real_odd[i].astype(np.int16) - interpolated[i].astype(np.int16)))
        for i in range(len(interpolated))
    ]
    return float(np.mean(np.array(diffs)))


def amt_interpolator(model: torch.nn.Module) -> Interpolator:
    def interpolate(f0: torch.Tensor, f1: torch.Tensor, t: float) -> torch.Tensor:
        embt = torch.full((f0.shape[0], 1, 1, 1), float(t), device=f0.device)
        return model(f0, f1, embt)

    return interpolate


class MotionSmoothness:
    """VBench's frame-interpolation rule on any interpolator (AMT-S in use; a stand-in in tests)."""

    def __init__(self, interpolator: Interpolator, device: str | torch.device = "cpu", pairs_per_batch: int = 1):
        self.interpolate = interpolator
        self.device = torch.device(device)
        # VBench interpolates one pair per call. AMT-S's per-image mean subtraction and
        # instance norms make a batch of pairs equal to the pairs one by one.
        self.pairs_per_batch = max(1, pairs_per_batch)

    @torch.no_grad()
    def video(self, frames: np.ndarray) -> float:
        """Score of uint8 RGB frames [T, H, W, 3] (T >= 3)."""
        if frames.shape[0] < 3:
            raise ValueError(f"motion smoothness needs at least 3 frames, got {frames.shape[0]}")
        h, w = frames.shape[1:3]
        pad = amt_padding(h, w)
        ph, pw = h + pad[2] + pad[3], w + pad[0] + pad[1]
        even = torch.from_numpy(np.ascontiguousarray(frames[0::2])).permute(0, 3, 1, 2).float() / 255.0
        even = F.pad(even, pad, mode="replicate")
        preds: list[np.ndarray] = []
        n = even.shape[0]
        for i in range(0, n - 1, self.pairs_per_batch):
            j = min(i + self.pairs_per_batch, n - 1)
            out = self.interpolate(even[i:j].to(self.device), even[i + 1 : j + 1].to(self.device), 0.5).float().cpu()
            out = out[..., pad[2] : ph - pad[3], pad[0] : pw - pad[1]]
            preds.extend(tensor_to_uint8(o) for o in out)
        diff = vfi_difference(list(frames[1::2]), preds)
        return (255.0 - diff) / 255.0


def motion_smoothness(scores: Sequence[float]) -> float:
    return float(np.mean(scores)) if len(scores) else math.nan
