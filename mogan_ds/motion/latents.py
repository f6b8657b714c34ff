"""Wan latent conventions shared by the motion path.

Normalisation. The generator, the teacher and the discriminator all work on *normalised*
latents, the space `WanPipeline` samples in. The VAE's own layers work on *raw* latents.
WanPipeline decodes with ``latents / (1 / std) + mean``, i.e.::

    raw = z * latents_std + latents_mean        z = (raw - latents_mean) / latents_std

with the per-channel vectors stored in ``vae.config`` (16 channels for Wan2.1).

Time axis. The Wan VAE is causal in time with a 4x temporal compression: latent chunk 0
is pixel frame 0 alone, latent chunk i >= 1 is pixel frames 4i-3 .. 4i. A clip of F = 4k+1
frames has k+1 latent chunks. A window of latent chunks [start, start + window) therefore
decodes to the half-open pixel range returned by `pixel_frame_range`.
"""

from __future__ import annotations

import torch

#: Temporal compression of the Wan2.1 VAE (``vae.config.scale_factor_temporal``).
TEMPORAL = 4
#: Spatial compression of the Wan2.1 VAE (``vae.config.scale_factor_spatial``).
SPATIAL = 8
#: Latent channels of the Wan2.1 VAE (``vae.config.z_dim``).
LATENT_CHANNELS = 16


def _stats(vae_config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as [1, C, 1, 1, 1] tensors on `like`'s device, in fp32 (the stats are fp32 numbers)."""
    mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32, device=like.device)
    std = torch.tensor(vae_config.latents_std, dtype=torch.float32, device=like.device)
    if mean.numel() != like.shape[1]:
        raise ValueError(f"latents have {like.shape[1]} channels, the VAE's latents_mean has {mean.numel()}")
    shape = (1, -1) + (1,) * (like.dim() - 2)
    return mean.view(shape), std.view(shape)


def denormalize(z: torch.Tensor, vae_config) -> torch.Tensor:
    """Normalised latents [B, C, T, h, w] -> the raw latents the VAE decoder consumes.

    Computed in fp32 (bf16 latents times std would lose bits the decoder amplifies) and
    returned in fp32; the caller casts to the VAE's dtype.
    """
    mean, std = _stats(vae_config, z)
    return z.float() * std + mean


def normalize(raw: torch.Tensor, vae_config) -> torch.Tensor:
    """Raw VAE latents [B, C, T, h, w] (e.g. the encoder's posterior mode) -> normalised latents, fp32."""
    mean, std = _stats(vae_config, raw)
    return (raw.float() - mean) / std


def num_latent_frames(num_frames: int, temporal: int = TEMPORAL) -> int:
    """Latent chunks of a clip of `num_frames` = temporal*k + 1 pixel frames."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"a Wan clip has {temporal}k+1 frames, got {num_frames}")
    return 1 + (num_frames - 1) // temporal


def num_pixel_frames(num_latent: int, temporal: int = TEMPORAL) -> int:
    """Pixel frames a clip of `num_latent` latent chunks decodes to."""
    if num_latent < 1:
        raise ValueError(f"need at least one latent chunk, got {num_latent}")
    return temporal * (num_latent - 1) + 1


def latent_shape(video_cfg, batch: int) -> tuple[int, int, int, int, int]:
    """(B, 16, T, H/8, W/8) of a `VideoConfig`'s clips: T = 1 + (F - 1) / 4 (chunk 0 is frame 0 alone)."""
    f, h, w = video_cfg.num_frames, video_cfg.height, video_cfg.width
    if h % SPATIAL or w % SPATIAL:
        raise ValueError(f"video {f}x{h}x{w}: H and W must be multiples of {SPATIAL} for the Wan VAE")
    return (int(batch), LATENT_CHANNELS, num_latent_frames(f), h // SPATIAL, w // SPATIAL)


def pixel_frame_range(start: int, window: int, temporal: int = TEMPORAL) -> tuple[int, int]:
    """Half-open pixel-frame range [first, stop) decoded from latent chunks [start, start + window).

    Chunk 0 -> frame 0; chunk i >= 1 -> frames temporal*i - 3 .. temporal*i. Examples (temporal 4):
    (0, 1) -> (0, 1); (1, 1) -> (1, 5); (0, 3) -> (0, 9); (2, 2) -> (5, 13).
    """
    if start < 0 or window < 1:
        raise ValueError(f"need start >= 0 and window >= 1, got start={start}, window={window}")
    first = 0 if start == 0 else temporal * (start - 1) + 1
    stop = temporal * (start + window - 1) + 1
    return first, stop


def chunk_frame_slice(i: int, temporal: int = TEMPORAL) -> slice:
    """Pixel frames of latent chunk i (the encoder's input chunking, the inverse of the decoder's)."""
    first, stop = pixel_frame_range(i, 1, temporal)
    return slice(first, stop)
