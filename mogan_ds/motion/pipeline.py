"""The motion path as one object: generator latents or real clips -> discriminator input.

``gan.space=flow`` (the paper)::

    latents[s:s+w] --chunked decode--> frames --RAFT--> flow --appendix A--> motion tensor
        --frozen VAE encoder--> D-input latents

``gan.space=latent`` ("w/o optical flow"): D sees the window of latents itself.

Frame/latent bookkeeping. A window of w latent chunks decodes to 4w pixel frames, or
4w-3 when it starts at chunk 0 (`latents.pixel_frame_range`). The VAE encoder takes
4k+1 frames, with chunk 0 a single frame. A 4w-frame motion tensor (or real clip) is
therefore padded at the front with one copy of its first frame, encoded to w+1 latent
chunks, and the padding's chunk is dropped; a 4w-3-frame one encodes to w chunks as it
is. Either way D sees exactly w latent frames, for fake and real alike, and the token
count does not depend on where the window starts.

The trainer calls `fake` (with grad, for the generator's GAN loss; detach `d_input` for
the discriminator's update) and `real` (no grad) with real clips of the same window
length. For the approximate R1/R2 perturbation, `encode_motion` is the map from the
paper's motion tensor m to D's input, so ``d_fn = lambda m: D(path.encode_motion(m))``
perturbs m itself; perturbing `d_input` instead is cheaper and is what ``space=latent``
does by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .chunked_decode import ChunkedWanDecoder, draw_window_start
from .flow import RaftFlow, motion_tensor


@dataclass
class MotionSample:
    """What the motion path produced for one batch.

    d_input: discriminator input latents [B, C, w, h, w_lat] (always set).
    frames:  the window's pixels [B, 3, F_w, H, W] (fake: decoded, unclamped; real: as given).
    flow:    RAFT flow [B, 2, F_w - 1, H, W] in pixels (space=flow only).
    motion:  the normalised motion tensor [B, 3, F_w, H, W] (space=flow only).
    """

    d_input: torch.Tensor
    frames: torch.Tensor | None = None
    flow: torch.Tensor | None = None
    motion: torch.Tensor | None = None


class MotionPath:
    """Frozen VAE (+ RAFT) glue between the generator's latents and the discriminator.

    Args:
        vae: frozen `AutoencoderKLWan` (any dtype/device; inputs are cast to it).
        raft: `RaftFlow` (required for space="flow", ignored for "latent").
        space: "flow" or "latent" (`gan.space`).
        flow_scale: `gan.flow_scale`, the motion-tensor normalisation (see `motion_tensor`).
        checkpoint: activation checkpointing in the decoder/encoder chunks (RAFT has its own).
    """

    def __init__(self, vae, raft: RaftFlow | None = None, space: str = "flow", flow_scale: float = 20.0, checkpoint: bool = True):
        if space not in ("flow", "latent"):
            raise ValueError(f"space must be 'flow' or 'latent', got {space!r}")
        if space == "flow" and raft is None:
            raise ValueError("space='flow' needs a RaftFlow")
        self.codec = ChunkedWanDecoder(vae, checkpoint=checkpoint)
        self.raft = raft
        self.space = space
        self.flow_scale = float(flow_scale)

    @classmethod
    def from_config(cls, gan_cfg, vae, raft_model: nn.Module | None = None, checkpoint: bool = True) -> MotionPath:
        """Build from `GANConfig` (space, flow_scale, raft_iters, raft_pairs_per_chunk) and a loaded RAFT."""
        raft = None
        if gan_cfg.space == "flow":
            if raft_model is None:
                raise ValueError("gan.space=flow needs the RAFT model (models.raft)")
            raft = RaftFlow(raft_model, num_iters=gan_cfg.raft_iters, pairs_per_chunk=gan_cfg.raft_pairs_per_chunk, checkpoint=checkpoint)
        return cls(vae, raft, gan_cfg.space, gan_cfg.flow_scale, checkpoint)

    def draw_start(self, num_latent: int, window: int, mode: str | int = "random", generator: torch.Generator | None = None) -> int:
        """The window's first latent chunk for this step (`gan.window_start`).

        In flow space a one-chunk window never starts at chunk 0, which decodes to a single
        frame (no flow); a fixed start of 0 with window 1 is rejected.
        """
        min_start = 1 if self.space == "flow" and window == 1 else 0
        return draw_window_start(num_latent, window, mode, generator, min_start=min_start)

    # ------------------------------------------------------------------ pieces
    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        """Video-shaped [B, 3, F, H, W] with F = 4w or 4w-3 -> normalised latents [B, C, w, H/8, W/8].

        Gradient flows to `video` when it requires grad (chunk-checkpointed encoder).
        """
        num_frames = video.shape[2]
        if num_frames % 4 == 1:
            return self.codec.encode(video)
        if num_frames % 4 == 0:
            padded = torch.cat([video[:, :, :1], video], dim=2)  # 4w+1 frames; chunk 0 = the copy
            return self.codec.encode(padded)[:, :, 1:]
        raise ValueError(f"a window of latent chunks spans 4w or 4w-3 frames, got {num_frames}")

    def encode_motion(self, motion: torch.Tensor) -> torch.Tensor:
        """Motion tensor [B, 3, F, H, W] -> D-input latents (space=flow); the paper's 'downstream encoder'."""
        return self.encode_frames(motion)

    def flow_and_motion(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames [B, 3, F, H, W] in [-1, 1] -> (flow [B, 2, F-1, H, W], motion [B, 3, F, H, W])."""
        flow = self.raft(frames)
        return flow, motion_tensor(flow, self.flow_scale)

    # ------------------------------------------------------------------ the two entry points
    def fake(self, latents: torch.Tensor, start: int, window: int) -> MotionSample:
        """Generator latents (normalised, with grad) -> D input for latent chunks [start, start + window).

        Gradients reach ``latents[:, :, start:start+window]`` (truncated BPTT: nothing
        before the window, and nothing after it is even decoded).
        """
        if self.space == "latent":
            if not (0 <= start and window >= 1 and start + window <= latents.shape[2]):
                raise ValueError(f"window [{start}, {start + window}) does not fit {latents.shape[2]} latent chunks")
            return MotionSample(d_input=latents[:, :, start : start + window])
        frames = self.codec.decode_window(latents, start, window)
        if frames.shape[2] < 2:
            raise ValueError(f"window [{start}, {start + window}) decodes to a single frame: no flow; use a window >= 2 or start >= 1")
        flow, motion = self.flow_and_motion(frames)
        return MotionSample(d_input=self.encode_motion(motion), frames=frames, flow=flow, motion=motion)

    @torch.no_grad()
    def real(self, frames: torch.Tensor) -> MotionSample:
        """Real clips of the window's length, [B, 3, F_w, H, W] in [-1, 1] -> D input (no grad)."""
        if self.space == "latent":
            return MotionSample(d_input=self.encode_frames(frames), frames=frames)
        flow, motion = self.flow_and_motion(frames)
        return MotionSample(d_input=self.encode_motion(motion), frames=frames, flow=flow, motion=motion)
