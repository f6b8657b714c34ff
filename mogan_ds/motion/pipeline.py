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

The window. `MotionPath` owns it: a `WindowSpec` (`motion.window`) parses and checks
`gan.window` / `gan.window_start`, `draw_window` picks each step's `Window`, and both
entry points take that `Window`: `fake` decodes the generator's latent chunks of it,
`real` cuts the same span out of a whole real clip. In latent space the real clip is
encoded from frame 0 to the window's end and the window's chunks are sliced, exactly as
the generator's whole-clip latents are laid out (a causal encoder given only the
window's frames would produce different latents, an artefact D could separate on).

The trainer calls `fake` (with grad, for the generator's GAN loss; detach `d_input` for
the discriminator's update) and `real` (no grad). For the approximate R1/R2
perturbation, `encode_motion` is the map from the paper's motion tensor m to D's input,
so ``d_fn = lambda m: D(path.encode_motion(m))`` perturbs m itself; perturbing `d_input`
instead is cheaper and is what ``space=latent`` does by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .chunked_decode import ChunkedWanDecoder
from .flow import RaftFlow, motion_tensor
from .sp_split import SplitMotion, share_bounds
from .window import Window, WindowSpec


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
        window: the `WindowSpec` of `gan.window` / `gan.window_start` for this clip length.
        space: "flow" or "latent" (`gan.space`).
        flow_scale: `gan.flow_scale`, the motion-tensor normalisation (see `motion_tensor`).
        checkpoint: activation checkpointing in the decoder/encoder chunks (RAFT has its own).
        checkpoint_every: `gan.cache_checkpoint_every`, the decoder/encoder cache checkpoint
            interval (`chunked_decode.run_chunks`).
        block_checkpoint: `gan.vae_block_checkpoint`, a nested checkpoint per VAE residual
            block inside each chunk (`chunked_decode.ChunkedWanDecoder`).
        sp: a topology (sp_group, sp_rank, sp_size, rank) whose SP group shares the fake path's
            work (`sp_split`, space="flow" only; `gan.split_over_sp`); None or sp_size 1: every
            rank runs the whole path. The real path stays whole on every rank (no grad).
    """

    def __init__(
        self,
        vae,
        raft: RaftFlow | None,
        window: WindowSpec,
        *,
        space: str = "flow",
        flow_scale: float = 20.0,
        checkpoint: bool = True,
        checkpoint_every: int = 1,
        block_checkpoint: bool = False,
        sp=None,
    ):
        if space not in ("flow", "latent"):
            raise ValueError(f"space must be 'flow' or 'latent', got {space!r}")
        if space == "flow" and raft is None:
            raise ValueError("space='flow' needs a RaftFlow")
        window.check()
        self.codec = ChunkedWanDecoder(
            vae, checkpoint=checkpoint, checkpoint_every=checkpoint_every, block_checkpoint=block_checkpoint
        )
        self.raft = raft
        self.window = window
        self.space = space
        self.flow_scale = float(flow_scale)
        self.split = None
        if sp is not None and sp.sp_size > 1 and space == "flow":
            share_bounds(window.length, sp.sp_size)  # a window shorter than the SP group fails here
            self.split = SplitMotion(self.codec, raft, self.flow_scale, sp)

    @classmethod
    def from_config(
        cls, gan_cfg, num_latent: int, vae, raft_model: nn.Module | None = None, checkpoint: bool = True, sp=None
    ) -> MotionPath:
        """Build from `GANConfig` (space, window, window_start, flow_scale, raft_*,
        cache_checkpoint_every, vae_block_checkpoint, split_over_sp) for clips of `num_latent` latent chunks, a loaded
        RAFT and the process topology `sp` (its SP group splits the fake path when
        gan.split_over_sp)."""
        raft = None
        if gan_cfg.space == "flow":
            if raft_model is None:
                raise ValueError("gan.space=flow needs the RAFT model (models.raft)")
            raft = RaftFlow(
                raft_model,
                num_iters=gan_cfg.raft_iters,
                pairs_per_chunk=gan_cfg.raft_pairs_per_chunk,
                checkpoint=checkpoint,
            )
        window = WindowSpec.from_config(gan_cfg, num_latent)
        return cls(
            vae,
            raft,
            window,
            space=gan_cfg.space,
            flow_scale=gan_cfg.flow_scale,
            checkpoint=checkpoint,
            checkpoint_every=gan_cfg.cache_checkpoint_every,
            block_checkpoint=gan_cfg.vae_block_checkpoint,
            sp=sp if gan_cfg.split_over_sp else None,
        )

    def draw_window(self, generator: torch.Generator | None = None) -> Window:
        """This step's window (`WindowSpec.draw`); pass a generator seeded alike on every rank."""
        return self.window.draw(generator)

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
    def fake(self, latents: torch.Tensor, window: Window) -> MotionSample:
        """Generator latents [B, C, T, h, w] (normalised, with grad) -> D input for `window`.

        Gradients reach ``latents[:, :, window.start:window.stop]`` (truncated BPTT: nothing
        before the window, and nothing after it is even decoded). With an SP split the latents
        must be the same on every rank of the group; `d_input` is the whole window's, while
        frames, flow and motion are this rank's share of it.
        """
        self._check_fits(window, latents.shape[2], "latent chunks")
        if self.space == "latent":
            return MotionSample(d_input=latents[:, :, window.start : window.stop])
        if self.split is not None:
            d_input, frames, flow, motion = self.split.fake(latents, window)
            return MotionSample(d_input=d_input, frames=frames, flow=flow, motion=motion)
        frames = self.codec.decode_window(latents, window.start, window.length)
        flow, motion = self.flow_and_motion(frames)
        return MotionSample(d_input=self.encode_motion(motion), frames=frames, flow=flow, motion=motion)

    @torch.no_grad()
    def real(self, clip: torch.Tensor, window: Window) -> MotionSample:
        """A whole real clip [B, 3, F, H, W] in [-1, 1] -> D input for the same `window` (no grad).

        flow: the window's frames go through RAFT exactly as decoded fakes do. latent: the
        clip is encoded from frame 0 to the window's end and the window's chunks are taken,
        so real latents carry the same causal context as the generator's.
        """
        first, stop = window.frames
        self._check_fits(window, clip.shape[2], "frames", need=stop)
        if self.space == "latent":
            latents = self.codec.encode(clip[:, :, : window.context_frames])
            return MotionSample(d_input=latents[:, :, window.start : window.stop], frames=clip[:, :, first:stop])
        frames = clip[:, :, first:stop]
        flow, motion = self.flow_and_motion(frames)
        return MotionSample(d_input=self.encode_motion(motion), frames=frames, flow=flow, motion=motion)

    @staticmethod
    def _check_fits(window: Window, have: int, unit: str, need: int | None = None) -> None:
        need = window.stop if need is None else need
        if have < need:
            raise ValueError(f"window [{window.start}, {window.stop}) needs {need} {unit}, the input has {have}")
