"""The motion path split over a sequence-parallel group: each SP rank handles its share of the window.

Why. The generator's latents x0 are identical on every rank of an SP group (Ulysses shards
only inside the DiT), so a replicated motion path (chunked decode -> RAFT -> encode of the
motion tensor) does the same work, and holds the same activations, on every SP rank. Here
rank r of S takes a contiguous share [lo, hi) of the window's latent chunks (`share_bounds`),
decodes it, takes its flow, encodes its motion tensor, and an all-gather assembles the
discriminator's input. Each rank's autograd graph covers its share only.

What crosses a share boundary, and how the gradient stays exact. The Wan VAE is causal:
chunk i depends on all earlier chunks through the decoder's (and the encoder's) causal
cache, and the last motion frame of a share needs the flow to the next share's first frame.

* Cache values: rank r > 0 runs the chunks before its share itself, under no_grad (the
  decoder's and, after RAFT on those frames, the encoder's), as truncated BPTT does before a
  window. Same operations on the same (replicated) latents: the values rank r-1 computes.
* Cache gradients: rank r turns those values into differentiable inputs (`_GradToPrev`);
  in backward, their gradients are sent to rank r-1, which adds them at its last chunk's
  cache outputs (`_GradFromNext`). This is the gradient that flows through the cache
  from share r into share r-1 when one process runs the whole window; nothing is
  truncated except what sp=1 truncates (the cache entering the window on rank 0).
* The next share's first frame: rank r < S-1 decodes one more chunk (hi) with grad from its
  own last cache and takes its first frame; its gradient reaches x0 on rank r (the chunk's
  other frames are unused), exactly the contribution that frame makes at sp=1.

Backward order (no deadlock): the all-gather's backward (a reduce-scatter, every rank);
then rank r < S-1 waits for rank r+1's encoder-cache gradients (sent when r+1 has
back-propagated its encoder share), runs its encoder and RAFT backward, waits for rank
r+1's decoder-cache gradients and runs its decoder backward; rank r > 0 sends its own two
messages as its encoder and decoder backward finish. Messages between two ranks go one way
(r+1 -> r) in a fixed order. The backward through the chain is therefore serial across
the SP ranks, as the recurrence is: this split saves memory (each rank holds its share's
caches and activations), not time.

Gradient scale. The gather back-propagates with a reduce-scatter (`mogan_ds.parallel.
gather_tensor`): each rank receives the SP sum of the D-input gradients of its share,
i.e. sp x its share's gradient in the SP-averaging convention of `mogan_ds.parallel.
ulysses`, as the replicated path gave every rank for the whole window. Summed over the
ranks by the generator's own gather, x0's gradient is the replicated path's, so ZeRO-3's
average over dp x sp gives the sp=1 gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import deepspeed.comm as dist
import torch

from ..parallel import gather_tensor
from .chunked_decode import CacheState, ChunkedWanDecoder
from .flow import RaftFlow, motion_tensor
from .latents import chunk_frame_slice
from .window import Window


def share_bounds(length: int, size: int) -> list[tuple[int, int]]:
    """Contiguous shares [lo, hi) of `length` window chunks over `size` ranks; the first
    ``length % size`` shares have one chunk more (rank 0 has no prefix to recompute)."""
    if size < 1 or length < size:
        raise ValueError(
            f"a window of {length} latent chunks cannot be split over {size} sequence-parallel ranks: "
            "use gan.window >= parallel.sp_size or gan.split_over_sp=false"
        )
    base, extra = divmod(length, size)
    bounds, lo = [], 0
    for r in range(size):
        hi = lo + base + (r < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


# --------------------------------------------------------------------------- links between neighbours


class PeerLink:
    """Point-to-point messages to the SP neighbours over `deepspeed.comm` (send/recv on the SP group).

    `topo` needs sp_group, sp_rank, sp_size and rank. SP groups are contiguous global ranks
    (`mogan_ds.parallel.topology.sp_dp_layout`), so neighbour r of this group is global rank
    ``rank - sp_rank + r``.
    """

    def __init__(self, topo):
        self.group, self.rank, self.size = topo.sp_group, topo.sp_rank, topo.sp_size
        self._first_global = topo.rank - topo.sp_rank

    def send_prev(self, tensors: Sequence[torch.Tensor]) -> None:
        dst = self._first_global + self.rank - 1
        for t in tensors:
            dist.send(t.contiguous(), dst, group=self.group)

    def recv_next(self, metas: Sequence[tuple]) -> list[torch.Tensor]:
        """One tensor per (shape, dtype, device), in the order rank+1 sent them."""
        src = self._first_global + self.rank + 1
        out = []
        for shape, dtype, device in metas:
            buf = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(buf, src, group=self.group)
            out.append(buf)
        return out


class _GradToPrev(torch.autograd.Function):
    """Rank r > 0: cache values computed without grad become differentiable inputs of this share.

    `anchor` (the latents) only makes the outputs require grad when the latents do. Backward
    sends the cache gradients to rank r-1 (`link.send_prev`).
    """

    @staticmethod
    def forward(ctx, link, anchor, *tensors):
        ctx.link = link
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.link.send_prev(grads)
        return (None, None, *(None for _ in grads))


class _GradFromNext(torch.autograd.Function):
    """Rank r < S-1: identity on `carrier`; backward adds, at this share's last cache `tensors`,
    the gradients rank r+1 sends (`link.recv_next`). Runs when `carrier`'s gradient is complete."""

    @staticmethod
    def forward(ctx, link, carrier, *tensors):
        ctx.link = link
        ctx.metas = [(t.shape, t.dtype, t.device) for t in tensors]  # not the tensors: nothing is kept alive
        return carrier.view_as(carrier)

    @staticmethod
    def backward(ctx, grad):
        return (None, grad, *ctx.link.recv_next(ctx.metas))


def link_from_prev(link, anchor: torch.Tensor, state: CacheState) -> CacheState:
    return state.with_tensors(_GradToPrev.apply(link, anchor, *state.tensors)) if state.tensors else state


def link_to_next(link, carrier: torch.Tensor, state: CacheState) -> torch.Tensor:
    return _GradFromNext.apply(link, carrier, *state.tensors) if state.tensors else carrier


# --------------------------------------------------------------------------- one rank's share


class SplitMotion:
    """The flow-space fake path of `MotionPath` for one SP rank (see the module docstring).

    Args:
        codec: the path's `ChunkedWanDecoder`; raft: its `RaftFlow`; flow_scale: `gan.flow_scale`.
        topo: sp_group, sp_rank, sp_size, rank (a `mogan_ds.parallel.Topology`).
    """

    def __init__(self, codec: ChunkedWanDecoder, raft: RaftFlow, flow_scale: float, topo):
        if topo.sp_size < 2:
            raise ValueError("SplitMotion needs an SP group of at least 2 ranks")
        self.codec, self.raft, self.flow_scale = codec, raft, flow_scale
        self.topo = topo
        self.link = PeerLink(topo)

    def fake(self, latents: torch.Tensor, window: Window):
        """latents [B, C, T, h, w] -> (D input [B, C, w, h/.., w/..] of the whole window (gathered),
        this rank's frames [B, 3, F_r, H, W], flow [B, 2, F_r - 1 or F_r, H, W], motion [B, 3, F_r, H, W])."""
        shares = share_bounds(window.length, self.topo.sp_size)
        d_share, frames, flow, motion = self.share(latents, window, shares, self.topo.sp_rank, self.link)
        return gather_shares(d_share, shares, self.topo), frames, flow, motion

    def share(self, latents: torch.Tensor, window: Window, shares: list[tuple[int, int]], rank: int, link):
        """Rank `rank`'s share of the window: (D-input latents of its chunks [B, C, hi-lo, ..], its
        frames, flow and motion tensor). `link` carries the cache gradients (`PeerLink` or, in
        tests, any object with send_prev / recv_next)."""
        lo, hi = shares[rank]
        first, last = rank == 0, rank == len(shares) - 1
        start = window.start
        codec = self.codec

        # Decoder: the cache entering the share. On rank 0 it is the window's truncation point.
        pre_frames, dec_state = codec.decode_prefix(latents, start + lo)
        pre_frames = pre_frames[start:]  # the window's chunks before this share (rank > 0)
        if not first:
            dec_state = link_from_prev(link, latents, dec_state)
        outs, dec_end = codec.decode_chunks(latents, start + lo, start + hi, dec_state)
        if not last:  # the next share's first frame, for the flow out of this share's last frame
            nxt, _ = codec.decode_chunks(latents, start + hi, start + hi + 1, dec_end)
            outs.append(nxt[0][:, :, :1])
        frames_ext = torch.cat(outs, dim=2)
        if not last:
            frames_ext = link_to_next(link, frames_ext, dec_end)

        flow = self.raft(frames_ext)
        motion = motion_tensor(flow, self.flow_scale, repeat_last=last)
        frames = frames_ext[:, :, : motion.shape[2]]

        # Encoder. Its input is the window's motion tensor, with one copy of the first frame in
        # front when the window does not start at chunk 0 (`MotionPath.encode_frames`): `pad`
        # encoder chunks come before D's first chunk.
        pad = int(start > 0)
        if first:
            enc_in = torch.cat([motion[:, :, :1], motion], dim=2) if pad else motion
            enc_first, enc_state = 0, codec.encoder_state()
        else:
            enc_in, enc_first = motion, lo + pad
            enc_state = self._encoder_prefix(pre_frames, frames_ext[:, :, :1].detach(), pad, enc_first)
            enc_state = link_from_prev(link, latents, enc_state)
        offset = chunk_frame_slice(enc_first).start
        chunks = []
        for j in range(enc_first, hi + pad):
            s = chunk_frame_slice(j)
            chunks.append(enc_in[:, :, s.start - offset : s.stop - offset])
        d_share, enc_end = codec.encode_chunks(chunks, enc_first, enc_state)
        d_share = d_share[:, :, pad if first else 0 :]
        if not last:
            d_share = link_to_next(link, d_share, enc_end)
        return d_share, frames, flow, motion

    @torch.no_grad()
    def _encoder_prefix(self, pre_frames: list[torch.Tensor], share_first: torch.Tensor, pad: int, stop: int):
        """The encoder cache after encoder chunk stop-1 from the window's frames before the share
        (plus the share's first frame, for the last prefix frame's flow), without grad."""
        frames = torch.cat([*pre_frames, share_first.to(pre_frames[0].dtype)], dim=2)
        motion = motion_tensor(self.raft(frames), self.flow_scale, repeat_last=False)
        enc_in = torch.cat([motion[:, :, :1], motion], dim=2) if pad else motion
        if enc_in.shape[2] != chunk_frame_slice(stop - 1).stop:
            raise RuntimeError(f"encoder prefix has {enc_in.shape[2]} frames for {stop} chunks")
        chunks = [enc_in[:, :, chunk_frame_slice(j)] for j in range(stop)]
        _, state = self.codec.encode_chunks(chunks, 0, self.codec.encoder_state())
        return state.detach()


def gather_shares(d_share: torch.Tensor, shares: list[tuple[int, int]], topo) -> torch.Tensor:
    """All SP ranks' shares [B, C, n_r, h, w] -> the window [B, C, sum n_r, h, w], on every rank.

    Autograd-aware (`gather_tensor`: backward = reduce-scatter, the SP convention). Shares
    of unequal length are zero-padded to the longest for the collective and cut back after.
    """
    longest = max(hi - lo for lo, hi in shares)
    n = d_share.shape[2]
    if n < longest:
        pad = d_share.new_zeros(*d_share.shape[:2], longest - n, *d_share.shape[3:])
        d_share = torch.cat([d_share, pad], dim=2)
    full = gather_tensor(d_share, 2, topo)
    if all(hi - lo == longest for lo, hi in shares):
        return full
    return torch.cat([full[:, :, r * longest : r * longest + (hi - lo)] for r, (lo, hi) in enumerate(shares)], dim=2)
