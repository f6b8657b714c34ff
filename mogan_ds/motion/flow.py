"""Frozen, differentiable RAFT optical flow and the discriminator's motion tensor.

`RaftFlow` wraps a torchvision RAFT (raft_large at scale, raft_small in tests; weights from
`mogan_ds.models.builders.load_raft`). Its parameters never train, but gradients flow
through it to the frames. RAFT's constraints: inputs in [-1, 1], H and W multiples of 8
and at least 128 (its correlation pyramid downsamples the 1/8 feature map three more
times), eval mode (raft_large has BatchNorm). Frames that miss them are resized
bilinearly and the flow is mapped back to the input resolution in the input's pixel
units. The all-pairs correlation volume is large (~156 MB fp32 per pair at 480x832), so
consecutive-frame pairs are processed `pairs_per_chunk` at a time, each chunk under
activation checkpointing.

Precision: RAFT always runs in fp32. torchvision's RAFT builds its coordinate grids and
sampling coordinates in fp32, so with half-precision weights its first `grid_sample`
fails ("expected scalar type BFloat16 but found Float"); it has 5M parameters, so fp32
costs nothing worth saving. Frames of any float dtype (a bf16 VAE's decode) are cast to
fp32 on the way in (the cast is differentiable), and the flow comes out in fp32.

`motion_tensor` turns F-1 flows into the 3-channel, F-frame "video" of appendix A.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint
from torchvision.utils import flow_to_image


def raft_input_size(height: int, width: int, min_size: int = 128) -> tuple[int, int]:
    """Smallest size >= (height, width) with both sides multiples of 8 and >= `min_size`."""

    def fit(n: int) -> int:
        return max(min_size, 8 * math.ceil(n / 8))

    return fit(height), fit(width)


class RaftFlow(nn.Module):
    """Flow between consecutive frames: [B, 3, F, H, W] in [-1, 1] -> [B, 2, F-1, H, W] (pixels, fp32).

    Channel 0 of the flow is the x (width) displacement, channel 1 the y displacement,
    both in pixels of the *input* resolution; flow[:, :, t] maps frame t to frame t+1.
    """

    def __init__(
        self,
        raft: nn.Module,
        num_iters: int = 12,
        pairs_per_chunk: int = 4,
        checkpoint: bool = True,
        min_size: int = 128,
    ):
        super().__init__()
        if num_iters < 1 or pairs_per_chunk < 1:
            raise ValueError(f"need num_iters >= 1 and pairs_per_chunk >= 1, got {num_iters}, {pairs_per_chunk}")
        # In place, as .to() is: the caller's RAFT becomes the fp32 frozen replica (module docstring).
        self.raft = raft.float().requires_grad_(False).eval()
        self.num_iters = num_iters
        self.pairs_per_chunk = pairs_per_chunk
        self.checkpoint = checkpoint
        self.min_size = min_size

    def train(self, mode: bool = True):
        # Frozen: a trainer's model.train() must not put RAFT's BatchNorm into training mode.
        super().train(mode)
        self.raft.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.raft.parameters()).dtype

    def _pair_flow(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        flow = self.raft(img1, img2, num_flow_updates=self.num_iters)[-1]  # last refinement
        # CorrBlock keeps the last correlation pyramid as a module attribute; drop it so that
        # checkpointing actually frees it (recomputation rebuilds it inside the same call).
        corr = getattr(self.raft, "corr_block", None)
        if corr is not None and hasattr(corr, "corr_pyramid"):
            corr.corr_pyramid = []
        return flow

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 5 or frames.shape[1] != 3:
            raise ValueError(f"expected frames [B, 3, F, H, W], got {tuple(frames.shape)}")
        b, c, f, h, w = frames.shape
        if f < 2:
            raise ValueError(f"optical flow needs at least 2 frames, got {f}")
        size = raft_input_size(h, w, self.min_size)
        x = frames.to(self.dtype).transpose(1, 2).reshape(b * f, c, h, w)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = x.view(b, f, c, *size)
        # All consecutive pairs of all clips form one batch of B*(F-1) pairs.
        img1 = x[:, :-1].reshape(b * (f - 1), c, *size)
        img2 = x[:, 1:].reshape(b * (f - 1), c, *size)
        recording = torch.is_grad_enabled() and frames.requires_grad
        flows = []
        for i in range(0, img1.shape[0], self.pairs_per_chunk):
            a, bb = img1[i : i + self.pairs_per_chunk], img2[i : i + self.pairs_per_chunk]
            if self.checkpoint and recording:
                # early_stop=False: a recomputation that stopped at its last saved tensor would
                # skip `_pair_flow`'s clearing of the correlation pyramid, and the module would
                # keep the recomputed pyramid (~1.7 GB for 8 pairs at 480x832) until the next
                # RAFT call. Running the recomputation to its end costs only the last update's
                # flow upsampling.
                flows.append(_checkpoint(self._pair_flow, a, bb, use_reentrant=False, early_stop=False))
            else:
                flows.append(self._pair_flow(a, bb))
        flow = torch.cat(flows, dim=0)
        if size != (h, w):
            # Back to the input grid, and from resized-frame pixels to input pixels per axis.
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
            scale = torch.tensor([w / size[1], h / size[0]], dtype=flow.dtype, device=flow.device)
            flow = flow * scale.view(1, 2, 1, 1)
        return flow.view(b, f - 1, 2, h, w).transpose(1, 2)


def motion_tensor(flow: torch.Tensor, scale: float, repeat_last: bool = True) -> torch.Tensor:
    """Appendix A motion tensor: flows [B, 2, F-1, H, W] (pixels) -> [B, 3, F, H, W].

    1. append a copy of the last flow, so there is one map per frame (F maps). With
       ``repeat_last=False`` nothing is appended ([B, 2, n] -> [B, 3, n]): a sequence-parallel
       share of a clip that is not its end has the flow to the next share's first frame instead;
    2. add the per-pixel magnitude sqrt(u^2 + v^2) as a third channel;
    3. divide all three channels by the fixed `scale` (``gan.flow_scale``, in pixels of
       the clip's resolution): displacements up to `scale` pixels land in [-1, 1] (the
       magnitude in [0, 1]). The map is linear with no clamp or tanh, so no gradient is
       zeroed; larger motions simply exceed 1, as bright pixels can in a decoded video.
    """
    if flow.dim() != 5 or flow.shape[1] != 2:
        raise ValueError(f"expected flow [B, 2, F-1, H, W], got {tuple(flow.shape)}")
    if scale <= 0:
        raise ValueError(f"flow scale must be positive, got {scale}")
    if repeat_last:
        flow = torch.cat([flow, flow[:, :, -1:]], dim=2)
    # vector_norm's backward is 0 (not NaN) where the flow is exactly 0.
    magnitude = torch.linalg.vector_norm(flow, dim=1, keepdim=True)
    return torch.cat([flow, magnitude], dim=1) / scale


@torch.no_grad()
def flow_to_rgb(flow: torch.Tensor) -> torch.Tensor:
    """Colour-wheel visualisation: [B, 2, T, H, W] -> uint8 [B, 3, T, H, W].

    Uses torchvision's `flow_to_image`, normalised by the largest flow of each clip (not
    of each frame), so a clip's frames share one colour scale.
    """
    if flow.dim() != 5 or flow.shape[1] != 2:
        raise ValueError(f"expected flow [B, 2, T, H, W], got {tuple(flow.shape)}")
    clips = [flow_to_image(clip.float().transpose(0, 1).contiguous()).transpose(0, 1) for clip in flow]
    return torch.stack(clips)
