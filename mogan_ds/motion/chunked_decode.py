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

Residual-block checkpointing (`block_checkpoint`, `gan.vae_block_checkpoint`). A chunk's
recomputation in backward holds every activation of that chunk at once: at 480x832 one
decoder chunk's recompute plus backward is ~18.6 GiB, the largest single term of the GAN
phase once the window is split over SP ranks. With it, each `WanResidualBlock` of the
decoder and encoder runs as its own nested checkpoint inside the chunk, in the same
functional form over the cache slots it reads and writes (`_checkpointed_block`), so the
chunk's recomputation keeps only the blocks' inputs and each block is recomputed once more
when backward reaches it: one extra forward of the residual blocks for a chunk peak of
about one block's activations. Inside a block, each norm -> nonlinearity pair runs as one
checkpoint per frame (`_per_frame_checkpoint`): the norm's fp32 backward temporaries, the
largest part of a block's backward at full resolution, are then one frame's. Outputs do not
change; gradients are equal to float rounding (a per-frame norm's backward may reduce over
channels in another vector blocking).

`ChunkedWanDecoder.decode_window(z, start, window)` decodes latent chunks
[start, start + window): chunks before the window run under `no_grad` only to build the
cache, which is detached at the window boundary (truncated BPTT: no gradient reaches
earlier latents), every chunk of the window runs checkpointed, and decoding stops after
the window. Autograd therefore holds, per window chunk, only its latent slice, its cache
tensors (two frames per causal conv) and its output frames: peak memory grows with the
window, not with the clip.

sqrt(T) checkpointing (`checkpoint_every` k, `gan.cache_checkpoint_every`). At the paper's
480x832 the cache at one chunk boundary is ~1.7 GiB, so even the per-window-chunk caches
dominate. With k > 1, segments of k chunks form one outer checkpoint around the per-chunk
ones: only every k-th boundary's cache stays saved until backward, and backward replays a
segment's chunks (without keeping their activations) to rebuild its inner caches: one
extra forward of k-1 of every k chunks (checkpoint's early stop skips the segment's last). k = ceil(sqrt(T)) minimises the saved caches (about 2 sqrt(T)
instead of T). The arithmetic is the same operations on the same values: outputs and
gradients equal k = 1's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResidualBlock, patchify, unpatchify
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


@dataclass(frozen=True)
class CacheState:
    """A Wan VAE half's feat_cache between two chunks: slot kinds plus the tensors, in slot order."""

    kinds: tuple
    tensors: tuple[torch.Tensor, ...]

    @classmethod
    def empty(cls, num_slots: int) -> CacheState:
        """Before chunk 0 (what `AutoencoderKLWan.clear_cache` allocates)."""
        return cls((None,) * num_slots, ())

    def detach(self) -> CacheState:
        return CacheState(self.kinds, tuple(t.detach() for t in self.tensors))

    def with_tensors(self, tensors) -> CacheState:
        tensors = tuple(tensors)
        if len(tensors) != len(self.tensors):
            raise ValueError(f"cache has {len(self.tensors)} tensors, got {len(tensors)}")
        return CacheState(self.kinds, tensors)


def segment_length(every: int, num_chunks: int) -> int:
    """Chunks per outer checkpoint segment: `every` (>= 1), or for 0 ceil(sqrt(num_chunks)).

    sqrt: with k chunks per segment, autograd holds ceil(n/k) boundary caches for the
    whole backward plus the k caches of the segment being back-propagated, which is
    smallest near k = sqrt(n).
    """
    if every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0 = sqrt of the chunks), got {every}")
    if every == 0:
        return math.isqrt(num_chunks - 1) + 1 if num_chunks > 1 else 1
    return every


def run_chunks(
    step: Callable[[int, torch.Tensor, list], torch.Tensor],
    chunks: Sequence[torch.Tensor],
    state: CacheState,
    first_index: int = 0,
    checkpoint: bool = True,
    every: int = 1,
) -> tuple[list[torch.Tensor], CacheState]:
    """Run chunks ``first_index, first_index + 1, ...`` of a Wan VAE half from `state`.

    Args:
        step: ``step(i, x_i, feat)`` runs chunk i through the VAE module, reading and
            overwriting the list `feat` exactly as `AutoencoderKLWan` does with its
            `_feat_map` / `_enc_feat_map`, and returns the chunk's output.
        chunks: the inputs of those chunks (views of one tensor are fine).
        state: the cache after chunk ``first_index - 1`` (`CacheState.empty` before chunk 0).
        checkpoint: when autograd records, run under non-reentrant activation checkpointing;
            otherwise (no_grad, nothing requiring grad, or False) plainly.
        every: cache checkpoint interval k. 1: every chunk is its own checkpoint, so the cache
            at every chunk boundary stays saved until backward. k > 1 (0 = ceil(sqrt(n)) for
            n chunks): segments of k chunks are checkpointed as a whole, each chunk inside
            again on its own (nested non-reentrant checkpoints); only the caches at segment
            boundaries stay saved, and backward re-runs a segment's first k-1 chunks once more
            to rebuild its inner caches (one extra forward of (k-1)/k of the chunks). Outputs
            and gradients are those of k = 1.

    Returns:
        (outputs of the chunks, the cache after the last one).
    """
    recording = torch.is_grad_enabled() and (
        any(x.requires_grad for x in chunks) or any(t.requires_grad for t in state.tensors)
    )
    if not (checkpoint and recording):
        return _run_plain(step, chunks, state, first_index)
    k = segment_length(every, len(chunks))
    outputs: list[torch.Tensor] = []
    for lo in range(0, len(chunks), k):
        seg = chunks[lo : lo + k]
        if len(seg) == 1:
            outs, state = _run_checkpointed_chunk(step, seg[0], state, first_index + lo)
        else:
            outs, state = _run_checkpointed_segment(step, seg, state, first_index + lo)
        outputs.extend(outs)
    return outputs, state


def _run_plain(step, chunks, state: CacheState, first_index: int) -> tuple[list[torch.Tensor], CacheState]:
    outputs = []
    for j, x in enumerate(chunks):
        feat = _unpack(state.kinds, state.tensors)
        outputs.append(step(first_index + j, x, feat))
        state = CacheState(*_pack(feat))
    return outputs, state


def _run_checkpointed_chunk(step, x, state: CacheState, i: int) -> tuple[list[torch.Tensor], CacheState]:
    """One chunk as the functional step ``(x_i, *cache) -> (out_i, *new_cache)`` under checkpoint."""
    # The new cache structure is a pure function of the old one and the chunk index, so the
    # closure's side channel gets the same value on forward and on recomputation. The closure
    # (kept by the checkpoint for recomputation) must not capture `state`: inside a segment
    # that would keep the cache tensors alive that the outer checkpoint is meant to drop.
    new_kinds: list[tuple] = []
    kinds = state.kinds

    def functional_step(x_i, *cache):
        feat = _unpack(kinds, cache)
        out = step(i, x_i, feat)
        out_kinds, tensors = _pack(feat)
        new_kinds[:] = [out_kinds]
        return (out, *tensors)

    result = _checkpoint(functional_step, x, *state.tensors, use_reentrant=False)
    return [result[0]], CacheState(new_kinds[0], tuple(result[1:]))


def _run_checkpointed_segment(step, seg, state: CacheState, i0: int) -> tuple[list[torch.Tensor], CacheState]:
    """Chunks i0 .. i0+len(seg)-1 as one outer checkpoint, each chunk inside on its own.

    Only the outer region's inputs (the chunks and the cache at i0) stay saved; its inner
    caches are rebuilt when backward reaches the segment. Nested non-reentrant checkpoints
    recompute correctly (torch's "nestable checkpoint" semantics).
    """
    n = len(seg)
    end_kinds: list[tuple] = []
    kinds = state.kinds  # not `state` in the closure (see _run_checkpointed_chunk)

    def functional_segment(*args):
        xs, cache = args[:n], args[n:]
        outs, st = [], CacheState(kinds, cache)
        for j, x in enumerate(xs):
            (out,), st = _run_checkpointed_chunk(step, x, st, i0 + j)
            outs.append(out)
        end_kinds[:] = [st.kinds]
        return (*outs, *st.tensors)

    result = _checkpoint(functional_segment, *seg, *state.tensors, use_reentrant=False)
    return list(result[:n]), CacheState(end_kinds[0], tuple(result[n:]))


def _per_frame_checkpoint(fn):
    """``fn`` (a per-position map of [B, C, T, H, W]) as one checkpoint per frame, nested in
    the block's: used for each of a residual block's norm -> nonlinearity pairs.

    `WanRMS_norm` normalises each position over its channels in fp32 on bf16 activations: its
    backward at full resolution holds about six fp32 temporaries the size of the chunk (3.4 of
    the ~6 GiB a block's backward needs at 480x832, which no SP split shrinks), and the norm's
    output is kept for the nonlinearity's backward. Per-position arithmetic makes it exact to
    apply both to each frame and concatenate; under a checkpoint per frame only the input is
    kept, and backward's temporaries are one frame's.
    """

    def wrapped(x):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return fn(x)
        # split (one autograd node: backward concatenates the frames' gradients once) rather
        # than slicing, whose backward makes a zero-padded full-size gradient per frame
        slices = [_checkpoint(fn, s, use_reentrant=False) for s in x.split(1, dim=2)]
        return slices[0] if len(slices) == 1 else torch.cat(slices, dim=2)

    return wrapped


def _checkpointed_block(block: torch.nn.Module):
    """Wrap a Wan VAE residual block's ``forward(x, feat_cache, feat_idx)`` as a nested checkpoint.

    The block reads and overwrites the cache list in place, from slot ``feat_idx[0]`` on. Under
    checkpoint it runs as ``(x, *cache tensors of slots >= i0) -> (out, *tensors it wrote)`` on
    a private list (slots before i0 are never read by it), so its recomputation sees the cache
    its forward saw; which slots it wrote, and their kinds, are a pure function of the kinds
    it was given, recorded on the forward and identical on recomputation. Its two norm ->
    nonlinearity pairs are per-frame checkpoints nested in it (`_per_frame_checkpoint`),
    installed by every (re)computation of the block: its recomputation runs in backward,
    after the chunk that installed the block's own wrapper has returned.
    """
    forward = block.forward

    def wrapped(x, feat_cache=None, feat_idx=None):
        if feat_cache is None or feat_idx is None:
            return forward(x, feat_cache=feat_cache, feat_idx=feat_idx if feat_idx is not None else [0])
        i0 = feat_idx[0]
        kinds, tensors = _pack(feat_cache[i0:])
        if not (torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors))):
            return forward(x, feat_cache=feat_cache, feat_idx=feat_idx)
        written: list[tuple] = []

        def fn(x_, *cache):
            local = [None] * i0 + _unpack(kinds, cache)
            idx = [i0]
            # The block applies `nonlinearity` right after each norm: for this (re)computation
            # each norm computes both, per frame, and the block's own nonlinearity is identity.
            act, norms = block.nonlinearity, (block.norm1, block.norm2)
            for norm in norms:
                norm.forward = _per_frame_checkpoint(lambda t, f=norm.forward: act(f(t)))
            block.nonlinearity = torch.nn.Identity()
            try:
                out = forward(x_, feat_cache=local, feat_idx=idx)
            finally:
                block.nonlinearity = act
                for norm in norms:
                    del norm.forward
            new_kinds, new = _pack(local[i0 : idx[0]])
            written[:] = [(new_kinds, idx[0])]
            return (out, *new)

        result = _checkpoint(fn, x, *tensors, use_reentrant=False)
        new_kinds, i1 = written[0]
        feat_cache[i0:i1] = _unpack(new_kinds, result[1:])
        feat_idx[0] = i1
        return result[0]

    return wrapped


class _BlockCheckpoints:
    """While active, every given residual block runs through `_checkpointed_block` (instance
    attributes over the class's forward, removed on exit: the shared VAE is left as it was)."""

    def __init__(self, blocks: Sequence[torch.nn.Module]):
        self.blocks = blocks

    def __enter__(self):
        for b in self.blocks:
            b.forward = _checkpointed_block(b)
        return self

    def __exit__(self, *exc):
        for b in self.blocks:
            del b.forward
        return False


class ChunkedWanDecoder:
    """Windowed, checkpointed decoding and encoding through a frozen `AutoencoderKLWan`.

    Holds a reference to the VAE (it is not a module of its own: the VAE stays wherever the
    caller keeps it, frozen). Latents on both sides are *normalised* (WanPipeline space);
    pixels are [-1, 1]-scaled video, never clamped here.

    Args:
        checkpoint: activation checkpointing of the chunks (when autograd records).
        checkpoint_every: cache checkpoint interval (`gan.cache_checkpoint_every`, see
            `run_chunks`): 1 keeps the cache of every chunk boundary for backward, k > 1
            only every k-th (recomputing the rest), 0 every ceil(sqrt(chunks))-th.
        block_checkpoint: each residual block of the decoder and encoder is a nested
            checkpoint inside its chunk (`gan.vae_block_checkpoint`, module docstring).
    """

    def __init__(self, vae, checkpoint: bool = True, checkpoint_every: int = 1, block_checkpoint: bool = False):
        self.vae = vae
        self.checkpoint = checkpoint
        segment_length(checkpoint_every, 1)  # validates
        self.checkpoint_every = checkpoint_every
        self._dec_slots = _count_causal_convs(vae.decoder)
        self._enc_slots = _count_causal_convs(vae.encoder)
        on = checkpoint and block_checkpoint
        self._dec_blocks = [m for m in vae.decoder.modules() if isinstance(m, WanResidualBlock)] if on else []
        self._enc_blocks = [m for m in vae.encoder.modules() if isinstance(m, WanResidualBlock)] if on else []

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    # ------------------------------------------------------------------ decoding
    def _decode_step(self, i: int, z_i: torch.Tensor, feat: list) -> torch.Tensor:
        """Latent chunk i (normalised, [B, C, 1, h, w]) -> its pixel frames, as `_decode` does it."""
        vae = self.vae
        raw = denormalize(z_i, vae.config).to(self.dtype)
        x = vae.post_quant_conv(raw)  # a 1x1x1 conv: per chunk == on the whole clip
        with _BlockCheckpoints(self._dec_blocks):
            out = vae.decoder(x, feat_cache=feat, feat_idx=[0], first_chunk=(i == 0))
        if vae.config.patch_size is not None:  # Wan2.2 VAE; identity for Wan2.1
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out

    def decoder_state(self) -> CacheState:
        """The decoder's cache before latent chunk 0."""
        return CacheState.empty(self._dec_slots)

    def decode_chunks(
        self, latents: torch.Tensor, lo: int, hi: int, state: CacheState
    ) -> tuple[list[torch.Tensor], CacheState]:
        """Latent chunks [lo, hi) of `latents` [B, C, T, h, w] from the cache after chunk lo-1.

        Returns (each chunk's unclamped frames [B, 3, 1 or 4, 8h, 8w], the cache after chunk
        hi-1). Records autograd when it is enabled and the latents or the cache need grad.
        """
        chunks = [latents[:, :, i : i + 1] for i in range(lo, hi)]
        return run_chunks(self._decode_step, chunks, state, lo, self.checkpoint, self.checkpoint_every)

    def decode_prefix(self, latents: torch.Tensor, stop: int) -> tuple[list[torch.Tensor], CacheState]:
        """Chunks [0, stop) without grad: their frames and the detached cache after them."""
        with torch.no_grad():
            frames, state = self.decode_chunks(latents, 0, stop, self.decoder_state())
        return frames, state.detach()

    def decode_window(self, latents: torch.Tensor, start: int, window: int) -> torch.Tensor:
        """Pixels of latent chunks [start, start + window), with gradient to those chunks only.

        Args:
            latents: normalised latents [B, C, T, h, w] (grad optional; any float dtype).
            start, window: the window; ``0 <= start``, ``start + window <= T``.

        Returns:
            Unclamped frames [B, 3, F_w, 8h, 8w] in the VAE's dtype, F_w = 4*window
            (4*window - 3 when start == 0); equal to frames `pixel_frame_range(start,
            window)` of a full decode. Gradients reach latents[:, :, start:start+window]
            only: the chunks before the window run without grad only to build the cache,
            which is detached at the window (truncated BPTT), and decoding stops after it.
        """
        num_latent = latents.shape[2]
        if not (0 <= start and window >= 1 and start + window <= num_latent):
            raise ValueError(f"window [{start}, {start + window}) does not fit {num_latent} latent chunks")
        _, state = self.decode_prefix(latents, start)
        outs, _ = self.decode_chunks(latents, start, start + window, state)
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
        with _BlockCheckpoints(self._enc_blocks):
            h = vae.encoder(x, feat_cache=feat, feat_idx=[0])
        return vae.quant_conv(h)  # 1x1x1, per chunk == on the concatenation

    def encoder_state(self) -> CacheState:
        """The encoder's cache before pixel chunk 0."""
        return CacheState.empty(self._enc_slots)

    def encode_chunks(
        self, chunks: Sequence[torch.Tensor], first_index: int, state: CacheState
    ) -> tuple[torch.Tensor, CacheState]:
        """Pixel chunks `first_index`, ... (chunk 0 one frame, the others 4) from the cache after
        chunk first_index-1 -> (normalised posterior mode [B, C, len(chunks), H/8, W/8] fp32, cache)."""
        outs, state = run_chunks(self._encode_step, chunks, state, first_index, self.checkpoint, self.checkpoint_every)
        return self._posterior_mode(torch.cat(outs, dim=2)), state

    def _posterior_mode(self, moments: torch.Tensor) -> torch.Tensor:
        mode = moments[:, : moments.shape[1] // 2]  # DiagonalGaussianDistribution: mean first, logvar second
        return normalize(mode, self.vae.config)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, F, H, W] (F = 4k+1) -> normalised posterior mode [B, C, k+1, H/8, W/8], fp32.

        Equals ``normalize(vae.encode(frames).latent_dist.mode())``, with gradient to
        `frames`; each latent chunk is checkpointed, so activation memory is one chunk's
        plus the (small) cache tensors of the saved chunk boundaries.
        """
        num_frames = frames.shape[2]
        if (num_frames - 1) % 4:
            raise ValueError(f"the Wan VAE encodes 4k+1 frames, got {num_frames}")
        chunks = [frames[:, :, chunk_frame_slice(i)] for i in range(num_latent_frames(num_frames))]
        return self.encode_chunks(chunks, 0, self.encoder_state())[0]


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
