"""Truncated-BPTT, chunk-checkpointed Wan VAE decoding (and encoding) with gradients.

The Wan VAE is chunk-recurrent: `AutoencoderKLWan._decode` feeds latent chunk i through
`vae.decoder` with a mutable list `feat_cache` that every causal conv reads (the last
frames of the previous chunk) and overwrites (with its own last frames). Three things make
the stock path unusable for a GAN loss on a long clip:

* it keeps the autograd graph of every chunk alive (memory grows with the clip);
* checkpointing it naively is wrong: recomputation in backward re-runs the convs against
  a `feat_cache` that has since been overwritten by later chunks (upstream bug);
* it clamps to [-1, 1] at the end, which zeroes gradients on saturated pixels.

Here each chunk is one *functional* step ``(z_i, *cache_tensors) -> (out_i, *new_cache_tensors)``.
The cache's non-tensor slots (``None`` before a conv has run, ``"Rep"`` for the temporal
upsampler's first-chunk placeholder) are a tuple of kinds captured in the closure; the
step rebuilds a fresh list from them, runs the VAE's own `decoder` module on it (the same
layers and cache conventions as `_decode`, nothing copied) and returns the tensors it
left in the list. Under non-reentrant `torch.utils.checkpoint`, recomputation gets exactly
the cache tensors the forward saw, so it cannot observe a mutated cache.

`ChunkedWanDecoder.decode_window(z, start, window)` decodes latent chunks
[start, start + window): chunks before the window run under `no_grad` only to build the
cache, which is detached at the window boundary (truncated BPTT: no gradient reaches
earlier latents), every chunk of the window runs checkpointed, and decoding stops after
the window. Autograd therefore holds, per window chunk, only its latent slice, its cache
tensors (two frames per causal conv) and its output frames: peak memory grows with the
window, not with the clip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, patchify, unpatchify
from torch.utils.checkpoint import checkpoint as _checkpoint

from .latents import chunk_frame_slice, denormalize, normalize, num_latent_frames

# Kinds of a feat_cache slot. A slot holds None (its conv has not run yet), the string
# "Rep" (WanResample's upsample3d marker after the first chunk) or a tensor.
_TENSOR = "tensor"


def _count_causal_convs(module: torch.nn.Module) -> int:
    """Length of a feat_cache list for `module` (what AutoencoderKLWan.clear_cache allocates)."""
    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


def _pack(feat: list) -> tuple[tuple, tuple[torch.Tensor, ...]]:
    """feat_cache list -> (kinds, tensors): the non-tensor structure and the tensors, in slot order."""
    kinds, tensors = [], []
    for entry in feat:
        if isinstance(entry, torch.Tensor):
            kinds.append(_TENSOR)
            tensors.append(entry)
        elif entry is None or entry == "Rep":
            kinds.append(entry)
        else:  # a diffusers change we do not know; fail loudly rather than drop state
            raise TypeError(f"unexpected feat_cache entry {type(entry).__name__}: {entry!r}")
    return tuple(kinds), tuple(tensors)


def _unpack(kinds: tuple, tensors: Sequence[torch.Tensor]) -> list:
    it = iter(tensors)
    feat = [next(it) if k == _TENSOR else k for k in kinds]
    if next(it, None) is not None:
        raise RuntimeError("feat_cache structure and tensors disagree")
    return feat


def run_recurrent(
    step: Callable[[int, torch.Tensor, list], torch.Tensor],
    chunks: Sequence[torch.Tensor],
    num_slots: int,
    grad_from: int = 0,
    checkpoint: bool = True,
) -> list[torch.Tensor]:
    """Run a Wan VAE half chunk by chunk with an explicit, functional cache.

    Args:
        step: ``step(i, x_i, feat)`` runs chunk i through the VAE module, reading and
            overwriting the list `feat` exactly as `AutoencoderKLWan` does with its
            `_feat_map` / `_enc_feat_map`, and returns the chunk's output.
        chunks: the inputs x_0 .. x_{n-1} (views of one tensor are fine).
        num_slots: feat_cache length (number of causal convs in the module).
        grad_from: chunks before this index run under `no_grad` only to build the cache,
            which is then detached (truncated BPTT); their outputs are not returned.
        checkpoint: run each chunk from `grad_from` on under non-reentrant activation
            checkpointing (only when autograd is recording; otherwise plainly).

    Returns:
        Outputs of chunks grad_from .. n-1.
    """
    kinds: tuple = (None,) * num_slots
    tensors: tuple[torch.Tensor, ...] = ()
    outputs = []
    for i, x in enumerate(chunks):
        if i < grad_from:
            with torch.no_grad():
                feat = _unpack(kinds, tensors)
                step(i, x, feat)
                kinds, tensors = _pack(feat)
            if i == grad_from - 1:
                tensors = tuple(t.detach() for t in tensors)  # the truncation point
            continue
        # The new cache structure is a pure function of the old one and the chunk index, so
        # the closure's side channel gets the same value on forward and on recomputation.
        new_kinds: list[tuple] = []

        def functional_step(x_i, *cache, _i=i, _kinds=kinds, _out=new_kinds):
            feat = _unpack(_kinds, cache)
            out = step(_i, x_i, feat)
            k, t = _pack(feat)
            _out[:] = [k]
            return (out, *t)

        recording = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors))
        if checkpoint and recording:
            result = _checkpoint(functional_step, x, *tensors, use_reentrant=False)
        else:
            result = functional_step(x, *tensors)
        outputs.append(result[0])
        kinds, tensors = new_kinds[0], tuple(result[1:])
    return outputs


class ChunkedWanDecoder:
    """Windowed, checkpointed decoding and encoding through a frozen `AutoencoderKLWan`.

    Holds a reference to the VAE (it is not a module of its own: the VAE stays wherever the
    caller keeps it, frozen). Latents on both sides are *normalised* (WanPipeline space);
    pixels are [-1, 1]-scaled video, never clamped here.
    """

    def __init__(self, vae, checkpoint: bool = True):
        self.vae = vae
        self.checkpoint = checkpoint
        self._dec_slots = _count_causal_convs(vae.decoder)
        self._enc_slots = _count_causal_convs(vae.encoder)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    # ------------------------------------------------------------------ decoding
    def _decode_step(self, i: int, z_i: torch.Tensor, feat: list) -> torch.Tensor:
        """Latent chunk i (normalised, [B, C, 1, h, w]) -> its pixel frames, as `_decode` does it."""
        vae = self.vae
        raw = denormalize(z_i, vae.config).to(self.dtype)
        x = vae.post_quant_conv(raw)  # a 1x1x1 conv: per chunk == on the whole clip
        out = vae.decoder(x, feat_cache=feat, feat_idx=[0], first_chunk=(i == 0))
        if vae.config.patch_size is not None:  # Wan2.2 VAE; identity for Wan2.1
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out

    def decode_window(self, latents: torch.Tensor, start: int, window: int) -> torch.Tensor:
        """Pixels of latent chunks [start, start + window), with gradient to those chunks only.

        Args:
            latents: normalised latents [B, C, T, h, w] (grad optional; any float dtype).
            start, window: the window; ``0 <= start``, ``start + window <= T``.

        Returns:
            Unclamped frames [B, 3, F_w, 8h, 8w] in the VAE's dtype, F_w = 4*window
            (4*window - 3 when start == 0); equal to frames `pixel_frame_range(start,
            window)` of a full decode. Gradients reach latents[:, :, start:start+window]
            only.
        """
        num_latent = latents.shape[2]
        if not (0 <= start and window >= 1 and start + window <= num_latent):
            raise ValueError(f"window [{start}, {start + window}) does not fit {num_latent} latent chunks")
        chunks = [latents[:, :, i : i + 1] for i in range(start + window)]  # early stop after the window
        outs = run_recurrent(self._decode_step, chunks, self._dec_slots, grad_from=start, checkpoint=self.checkpoint)
        return torch.cat(outs, dim=2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The whole clip (window = all chunks), unclamped."""
        return self.decode_window(latents, 0, latents.shape[2])

    # ------------------------------------------------------------------ encoding
    def _encode_step(self, i: int, x_i: torch.Tensor, feat: list) -> torch.Tensor:
        """Pixel chunk i ([B, 3, 1 or 4, H, W]) -> its raw posterior parameters, as `_encode` does it."""
        vae = self.vae
        x = x_i.to(self.dtype)
        if vae.config.patch_size is not None:
            x = patchify(x, patch_size=vae.config.patch_size)
        h = vae.encoder(x, feat_cache=feat, feat_idx=[0])
        return vae.quant_conv(h)  # 1x1x1, per chunk == on the concatenation

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, F, H, W] (F = 4k+1) -> normalised posterior mode [B, C, k+1, H/8, W/8], fp32.

        Equals ``normalize(vae.encode(frames).latent_dist.mode())``, with gradient to
        `frames`; each latent chunk is checkpointed, so activation memory is one chunk's
        plus the (small) cache tensors of all chunks.
        """
        num_frames = frames.shape[2]
        if (num_frames - 1) % 4:
            raise ValueError(f"the Wan VAE encodes 4k+1 frames, got {num_frames}")
        chunks = [frames[:, :, chunk_frame_slice(i)] for i in range(num_latent_frames(num_frames))]
        outs = run_recurrent(self._encode_step, chunks, self._enc_slots, grad_from=0, checkpoint=self.checkpoint)
        moments = torch.cat(outs, dim=2)
        mode = moments[:, : moments.shape[1] // 2]  # DiagonalGaussianDistribution: mean first, logvar second
        return normalize(mode, self.vae.config)


def plain_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Reference: the stock `AutoencoderKLWan._decode` loop without its final clamp.

    Uses the VAE's own `clear_cache` / `_feat_map` machinery and keeps the whole autograd
    graph (no truncation, no checkpointing). This is the baseline the chunked decoder is
    tested and benchmarked against; do not train through it on long clips.
    """
    raw = denormalize(latents, vae.config).to(next(vae.parameters()).dtype)
    vae.clear_cache()
    x = vae.post_quant_conv(raw)
    outs = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        outs.append(
            vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=(i == 0))
        )
    vae.clear_cache()  # drop the references to the last chunk's activations
    out = torch.cat(outs, dim=2)
    if vae.config.patch_size is not None:
        out = unpatchify(out, patch_size=vae.config.patch_size)
    return out
