"""RaftFlow (frozen, differentiable torchvision RAFT), the appendix-A motion tensor and flow_to_rgb."""

import pytest
import torch
from torch import nn

from mogan_ds.models.builders import build_raft
from mogan_ds.motion.flow import RaftFlow, flow_to_rgb, motion_tensor, raft_input_size


@pytest.fixture(scope="module")
def raft():
    torch.manual_seed(0)
    return build_raft("raft_small")  # random init: the tests check plumbing, not flow quality


def _frames(b, f, h, w, seed):
    return torch.rand(b, 3, f, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_consecutive_pairs_match_direct_raft_calls(raft):
    x = _frames(2, 3, 128, 128, 0)
    # 4 pairs in chunks of 3: a chunk spans both clips, so the batching must not mix them up.
    flow = RaftFlow(raft, num_iters=3, pairs_per_chunk=3)(x)
    assert flow.shape == (2, 2, 2, 128, 128)
    with torch.no_grad():
        for b in range(2):
            for t in range(2):
                ref = raft(x[b : b + 1, :, t], x[b : b + 1, :, t + 1], num_flow_updates=3)[-1][0]
                assert (flow[b, :, t] - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


class ConstantFlowRaft(nn.Module):
    """A stand-in with RAFT's call signature that records its inputs and returns a known flow."""

    def __init__(self, u, v):
        super().__init__()
        self.u, self.v = u, v
        self.weight = nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, img1, img2, num_flow_updates=12):
        self.calls.append((tuple(img1.shape), num_flow_updates))
        n, _, h, w = img1.shape
        flow = torch.stack([torch.full((n, h, w), self.u), torch.full((n, h, w), self.v)], dim=1)
        return [flow * 0, flow * self.weight + 0 * (img1 + img2).sum()]


def test_resize_to_raft_sizes_and_flow_back_in_input_pixels():
    assert raft_input_size(64, 96) == (128, 128)
    assert raft_input_size(130, 832) == (136, 832)
    assert raft_input_size(480, 832) == (480, 832)
    stub = ConstantFlowRaft(u=8.0, v=4.0)
    flow = RaftFlow(stub, num_iters=5, pairs_per_chunk=2)(_frames(1, 4, 64, 96, 1))
    assert stub.calls == [((2, 3, 128, 128), 5), ((1, 3, 128, 128), 5)]
    assert flow.shape == (1, 2, 3, 64, 96)
    # 8 px on a 128-wide resized frame is 6 px on the 96-wide input; 4 px of 128 rows is 2 px of 64.
    torch.testing.assert_close(flow[:, 0], torch.full((1, 3, 64, 96), 6.0))
    torch.testing.assert_close(flow[:, 1], torch.full((1, 3, 64, 96), 2.0))
    # No resize when the size already fits: the flow comes through untouched.
    stub.calls.clear()
    flow = RaftFlow(stub, num_iters=5)(_frames(1, 2, 128, 136, 2))
    assert stub.calls == [((1, 3, 128, 136), 5)] and flow[:, 0].eq(8.0).all() and flow[:, 1].eq(4.0).all()


def test_gradients_reach_frames_and_checkpointing_is_exact(raft):
    x = _frames(1, 4, 128, 128, 3).requires_grad_(True)
    w = torch.randn(1, 2, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    grads = []
    for ckpt in (True, False):
        (g,) = torch.autograd.grad((RaftFlow(raft, num_iters=2, pairs_per_chunk=2, checkpoint=ckpt)(x) * w).sum(), x)
        grads.append(g)
    assert grads[0].abs().max().item() > 0
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-5 * grads[1].abs().max().item()
    assert all(p.grad is None and not p.requires_grad for p in raft.parameters())  # frozen
    # The backward's recomputation ran to the end of each chunk's call, which clears RAFT's
    # correlation pyramid: an early-stopped one would leave the last chunk's pyramid on the
    # module (~1.7 GB at 480x832) until the next call.
    assert raft.corr_block.corr_pyramid == []


def test_raft_stays_in_eval_mode():
    raft = build_raft("raft_large")  # has BatchNorm, which must never switch to batch statistics
    module = RaftFlow(raft).train()
    assert module.training and not raft.training
    assert not any(m.training for m in raft.modules())
    with pytest.raises(ValueError, match="at least 2 frames"):
        module(torch.zeros(1, 3, 1, 128, 128))


def test_motion_tensor_by_hand():
    flow = torch.zeros(1, 2, 2, 1, 2)
    flow[0, :, 0, 0, 0] = torch.tensor([3.0, 4.0])  # |f| = 5
    flow[0, :, 1, 0, 1] = torch.tensor([-6.0, 8.0])  # |f| = 10
    m = motion_tensor(flow, scale=10.0)
    assert m.shape == (1, 3, 3, 1, 2)
    expected = torch.zeros(1, 3, 3, 1, 2)
    expected[0, :, 0, 0, 0] = torch.tensor([0.3, 0.4, 0.5])
    expected[0, :, 1, 0, 1] = torch.tensor([-0.6, 0.8, 1.0])
    expected[0, :, 2, 0, 1] = torch.tensor([-0.6, 0.8, 1.0])  # the last flow, duplicated
    torch.testing.assert_close(m, expected)
    # Zero flow (static pixels) must not produce NaN gradients through the magnitude.
    f = flow.clone().requires_grad_(True)
    motion_tensor(f, 10.0).sum().backward()
    assert torch.isfinite(f.grad).all()
    torch.testing.assert_close(f.grad[0, :, 0, 0, 0], torch.tensor([0.1 + 0.3 / 5, 0.1 + 0.4 / 5]))


def test_flow_to_rgb_shares_one_scale_per_clip():
    from torchvision.utils import flow_to_image

    flow = torch.randn(2, 2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    flow[1] *= 10
    rgb = flow_to_rgb(flow)
    assert rgb.shape == (2, 3, 3, 8, 8) and rgb.dtype == torch.uint8
    for b in range(2):
        assert torch.equal(rgb[b], flow_to_image(flow[b].transpose(0, 1).contiguous()).transpose(0, 1))
    # Scaling a clip's flow does not change its picture (normalised by the clip's max).
    assert (rgb[1].int() - flow_to_rgb(flow[1:] / 10)[0].int()).abs().max() <= 1  # uint8 rounding


# --------------------------------------------------------------------------- the SP split of the fake path


class QueueLink:
    """The neighbour messages of `sp_split.PeerLink` within one process: rank r's send_prev
    feeds rank r-1's recv_next, first in first out (ranks back-propagate from the last).
    `drop` sends zeros instead (a negative control: the cache gradients left out)."""

    def __init__(self, boxes: list, rank: int, drop: bool = False):
        self.boxes, self.rank, self.drop = boxes, rank, drop

    def send_prev(self, tensors):
        self.boxes[self.rank - 1].extend(t.detach().clone() * (0 if self.drop else 1) for t in tensors)

    def recv_next(self, metas):
        out = [self.boxes[self.rank].pop(0) for _ in metas]
        assert [(o.shape, o.dtype) for o in out] == [(s, d) for s, d, _ in metas]
        return out


@pytest.mark.parametrize("start,window,size,every", [(0, 4, 2, 1), (1, 3, 2, 2), (0, 4, 3, 1), (1, 3, 3, 1)])
def test_sp_split_shares_add_up_to_the_whole_path(raft, start, window, size, every):
    """Each rank's share (prefix without grad, cache gradients handed back rank by rank) gives the
    whole window's D input and, summed over the ranks, the whole path's gradient on the latents."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKLWan

    from mogan_ds.models.tiny import TINY_VAE
    from mogan_ds.motion.pipeline import MotionPath
    from mogan_ds.motion.sp_split import SplitMotion, share_bounds
    from mogan_ds.motion.window import Window, WindowSpec

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**TINY_VAE).eval().requires_grad_(False)
    path = MotionPath(
        vae, RaftFlow(raft, num_iters=2, pairs_per_chunk=3), WindowSpec(4, window, start), checkpoint_every=every
    )
    win = Window(start, window)
    z = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    weight = torch.randn(1, 16, window, 4, 4, generator=torch.Generator().manual_seed(9))
    zr = z.clone().requires_grad_(True)
    ref = path.fake(zr, win).d_input
    (ref * weight).sum().backward()

    topo = SimpleNamespace(sp_group=None, sp_rank=0, sp_size=size, rank=0)
    split = SplitMotion(path.codec, path.raft, path.flow_scale, topo)
    shares = share_bounds(window, size)

    def run(drop=False):
        boxes = [[] for _ in range(size)]
        zs = [z.clone().requires_grad_(True) for _ in range(size)]
        outs = [split.share(zs[r], win, shares, r, QueueLink(boxes, r, drop))[0] for r in range(size)]
        for r in reversed(range(size)):  # rank r+1's backward sends what rank r's receives
            lo, hi = shares[r]
            outs[r].backward(weight[:, :, lo:hi])
        assert all(not b for b in boxes)  # every message was consumed
        return torch.cat(outs, dim=2).detach(), sum(t.grad for t in zs)

    d_input, grad = run()
    torch.testing.assert_close(d_input, ref.detach(), atol=1e-5, rtol=1e-5)
    scale = zr.grad.abs().max().item()
    assert scale > 0 and zr.grad[:, :, start : start + window].abs().amax(dim=(0, 1, 3, 4)).min().item() > 0
    assert (grad - zr.grad).abs().max().item() <= 1e-5 * scale
    if (start, size) == (0, 2):  # without the cache gradients between the shares the sum is wrong
        _, dropped = run(drop=True)
        assert (dropped - zr.grad).abs().max().item() > 1e-3 * scale
