"""Chunked truncated-BPTT decoder and chunked encoder against the stock AutoencoderKLWan (fp32, CPU)."""

import pytest
import torch

from mogan_ds.motion.chunked_decode import ChunkedWanDecoder, plain_decode
from mogan_ds.motion.latents import denormalize, normalize, num_latent_frames, num_pixel_frames, pixel_frame_range

T = 4  # latent chunks of the test clip (13 frames); 4x4 latents = 32x32 pixels keep it fast


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKLWan

    from mogan_ds.models.tiny import TINY_VAE

    torch.manual_seed(0)
    return AutoencoderKLWan(**TINY_VAE).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 16, T, 4, 4, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def full(vae, latents):
    with torch.no_grad():
        return plain_decode(vae, latents)


def test_latent_frame_bookkeeping():
    assert [pixel_frame_range(s, w) for s, w in [(0, 1), (1, 1), (0, 3), (2, 2), (1, 12)]] == [
        (0, 1),
        (1, 5),
        (0, 9),
        (5, 13),
        (1, 49),
    ]
    assert num_latent_frames(49) == 13 and num_pixel_frames(13) == 49 and num_latent_frames(1) == 1
    with pytest.raises(ValueError, match="4k\\+1"):
        num_latent_frames(48)


def test_normalisation_is_wanpipelines(vae, latents):
    # WanPipeline decodes `latents / (1 / std) + mean`.
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    raw = denormalize(latents, vae.config)
    torch.testing.assert_close(raw, latents / (1.0 / std) + mean)
    torch.testing.assert_close(normalize(raw, vae.config), latents, atol=1e-6, rtol=0)


def test_full_window_equals_stock_decode(vae, latents, full):
    dec = ChunkedWanDecoder(vae)
    with torch.no_grad():
        ours = dec.decode_window(latents, 0, T)
        stock = vae.decode(denormalize(latents, vae.config)).sample
    assert ours.shape == stock.shape == (1, 3, num_pixel_frames(T), 32, 32)
    assert (ours.clamp(-1, 1) - stock).abs().max().item() <= 1e-5
    assert (ours - full).abs().max().item() <= 1e-5
    # The clip saturates somewhere, and we do not clamp: those pixels keep their values.
    assert ours.abs().max().item() > 1.05


@pytest.mark.parametrize("start,window", [(s, w) for s in range(T) for w in range(1, T - s + 1)])
def test_every_window_matches_the_full_decode(vae, latents, full, start, window):
    with torch.no_grad():
        ours = ChunkedWanDecoder(vae).decode_window(latents, start, window)
    first, stop = pixel_frame_range(start, window)
    assert ours.shape[2] == stop - first
    assert (ours - full[:, :, first:stop]).abs().max().item() <= 1e-5


def _window_grad(fn, latents, start, window, weight):
    z = latents.clone().requires_grad_(True)
    frames = fn(z)
    first, stop = pixel_frame_range(start, window)
    if frames.shape[2] != stop - first:  # a full decode: select the window's frames
        frames = frames[:, :, first:stop]
    (frames * weight).sum().backward()
    return z.grad


@pytest.mark.parametrize("start,window", [(0, T), (1, 2), (3, 1)])
def test_window_gradients_equal_plain_autograd(vae, latents, start, window):
    first, stop = pixel_frame_range(start, window)
    weight = torch.randn(1, 3, stop - first, 32, 32, generator=torch.Generator().manual_seed(2))
    ckpt = _window_grad(
        lambda z: ChunkedWanDecoder(vae).decode_window(z, start, window), latents, start, window, weight
    )
    nockpt = _window_grad(
        lambda z: ChunkedWanDecoder(vae, checkpoint=False).decode_window(z, start, window),
        latents,
        start,
        window,
        weight,
    )
    # Plain autograd through the stock loop over the whole clip: the loss only sees the
    # window's frames, so (causality) the window's latents get the same gradient.
    plain = _window_grad(lambda z: plain_decode(vae, z), latents, start, window, weight)
    win = slice(start, start + window)
    assert ckpt[:, :, win].abs().max().item() > 1e-3
    assert (ckpt[:, :, win] - plain[:, :, win]).abs().max().item() <= 1e-5
    assert (ckpt - nockpt).abs().max().item() <= 1e-5
    # Truncated BPTT: nothing before the window, and nothing after it, gets a gradient.
    assert ckpt[:, :, :start].abs().sum().item() == 0 and ckpt[:, :, start + window :].abs().sum().item() == 0
    if start > 0:
        assert plain[:, :, :start].abs().sum().item() > 0  # ... whereas the untruncated decode does


def test_no_clamp_keeps_gradients_of_saturated_pixels(vae, latents, full):
    mask = (full.abs() > 1).float()
    assert mask.sum() > 0
    z = latents.clone().requires_grad_(True)
    (ChunkedWanDecoder(vae).decode_window(z, 0, T) * mask).sum().backward()
    ours = z.grad.abs().sum().item()
    z.grad = None
    (vae.decode(denormalize(z, vae.config)).sample * mask).sum().backward()
    assert ours > 0 and z.grad.abs().sum().item() == 0  # the stock clamp zeroes them


def _saved_bytes(fn):
    """Bytes autograd saves for backward outside any checkpoint (the checkpoint's own hooks shadow these)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_autograd_state_grows_with_the_window_not_the_clip(vae, latents):
    z = latents.clone().requires_grad_(True)
    plain = ChunkedWanDecoder(vae, checkpoint=False)
    late, early = (_saved_bytes(lambda s=s: plain.decode_window(z, s, 1)) for s in (3, 1))
    two = _saved_bytes(lambda: plain.decode_window(z, 1, 2))
    assert late == early > 0  # the no-grad prefix records nothing
    assert two > 1.5 * early  # a longer window records more
    # With checkpointing the chunks' activations are not saved (they are recomputed in backward).
    # What it still holds: each chunk's latent slice and cache tensors (two frames per causal conv).
    assert _saved_bytes(lambda: ChunkedWanDecoder(vae).decode_window(z, 1, 2)) < 0.1 * two


def test_encode_equals_vae_encode_with_gradient(vae):
    x = (torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1).requires_grad_(True)
    ours = ChunkedWanDecoder(vae).encode(x)
    stock = normalize(vae.encode(x).latent_dist.mode(), vae.config)
    assert ours.shape == (1, 16, 3, 4, 4)
    assert (ours - stock).abs().max().item() <= 1e-5
    w = torch.randn(ours.shape, generator=torch.Generator().manual_seed(4))
    (g_ours,) = torch.autograd.grad((ours * w).sum(), x)
    (g_stock,) = torch.autograd.grad((stock * w).sum(), x)
    assert g_ours.abs().max().item() > 1e-4
    assert (g_ours - g_stock).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="4k\\+1"):
        ChunkedWanDecoder(vae).encode(x[:, :, :8])


def test_bf16_vae_with_fp32_latents(vae, latents, full):
    import copy

    vae16 = copy.deepcopy(vae).to(torch.bfloat16)
    z = latents[:, :, :2].clone().requires_grad_(True)
    out = ChunkedWanDecoder(vae16).decode_window(z, 1, 1)
    assert out.dtype == torch.bfloat16
    assert (out.float() - full[:, :, 1:5]).abs().max().item() < 0.1  # bf16 rounding only
    out.float().sum().backward()
    assert z.grad.dtype == torch.float32 and z.grad[:, :, 1].abs().sum() > 0


def test_window_must_fit(vae, latents):
    with pytest.raises(ValueError, match="does not fit"):
        ChunkedWanDecoder(vae).decode_window(latents, 3, 2)


# ---------------------------------------------------------------- sqrt(T) cache checkpointing (checkpoint_every)


def test_segment_length():
    from mogan_ds.motion.chunked_decode import segment_length

    assert [segment_length(0, n) for n in (1, 2, 4, 5, 12, 13, 16, 17)] == [1, 2, 2, 3, 4, 4, 4, 5]
    assert segment_length(3, 13) == 3 and segment_length(1, 13) == 1
    with pytest.raises(ValueError, match=">= 0"):
        segment_length(-1, 4)


def _decoder_forwards(vae, fn) -> int:
    calls = [0]
    handle = vae.decoder.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    try:
        fn()
    finally:
        handle.remove()
    return calls[0]


@pytest.mark.parametrize("every", [2, 3, 0])
@pytest.mark.parametrize("start,window", [(0, T), (1, 3)])
def test_cache_checkpoint_every_k_equals_k1_and_plain_autograd(vae, latents, start, window, every):
    """Every k (3 divides neither window, 0 = ceil(sqrt)) gives k=1's frames and gradients bit for bit,
    and plain autograd's through the stock loop; backward replays the segments' chunks once more."""
    first, stop = pixel_frame_range(start, window)
    weight = torch.randn(1, 3, stop - first, 32, 32, generator=torch.Generator().manual_seed(5))

    def run(k):
        z = latents.clone().requires_grad_(True)
        frames = ChunkedWanDecoder(vae, checkpoint_every=k).decode_window(z, start, window)
        forwards = _decoder_forwards(vae, lambda: (frames * weight).sum().backward())
        return frames.detach(), z.grad, forwards

    ref_frames, ref_grad, ref_fw = run(1)
    frames, grad, fw = run(every)
    assert torch.equal(frames, ref_frames) and torch.equal(grad, ref_grad)
    plain = _window_grad(lambda z: plain_decode(vae, z), latents, start, window, weight)
    win = slice(start, start + window)
    assert grad[:, :, win].abs().max().item() > 1e-3
    assert (grad[:, :, win] - plain[:, :, win]).abs().max().item() <= 1e-5
    assert grad[:, :, :start].abs().sum().item() == 0
    # Backward: k=1 recomputes each chunk once; k>1 also replays a segment's chunks up to its last
    # (whose cache input is the last one the segment must rebuild: checkpoint's early stop).
    from mogan_ds.motion.chunked_decode import segment_length

    k = segment_length(every, window)
    replayed = sum(min(k, window - lo) - 1 for lo in range(0, window, k))
    assert ref_fw == window and fw == window + replayed > window


def test_cache_checkpoint_every_keeps_fewer_caches_alive(vae, latents):
    """What stays allocated between forward and backward (live bytes, not only autograd's saved
    tensors: a checkpoint's recomputation closure could keep a cache alive as well)."""
    from mogan_ds.plan.memory import LiveBytes

    held = {}
    for k in (1, 2, T):
        z = latents.clone().requires_grad_(True)
        with LiveBytes() as lb:
            frames = ChunkedWanDecoder(vae, checkpoint_every=k).decode_window(z, 0, T)
            held[k] = lb.live - frames.untyped_storage().nbytes()
            frames.sum().backward()
    # k=1 keeps the cache after each of chunks 0..2, k=2 only after chunk 1, k=T none.
    assert held[1] > held[2] > held[T] >= 0
    cache = (held[1] - held[T]) / 3  # one boundary's cache
    assert held[2] - held[T] == pytest.approx(cache, rel=0.3)


@pytest.mark.parametrize("every", [2, 3, 0])
def test_encode_with_cache_checkpoint_every_k(vae, every):
    x = (torch.rand(1, 3, 13, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1).requires_grad_(True)
    w = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    ours = ChunkedWanDecoder(vae, checkpoint_every=every).encode(x)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), x)
    ref = ChunkedWanDecoder(vae).encode(x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    stock = normalize(vae.encode(x).latent_dist.mode(), vae.config)
    (g_stock,) = torch.autograd.grad((stock * w).sum(), x)
    assert torch.equal(ours, ref) and torch.equal(g_ours, g_ref)
    assert (ours - stock).abs().max().item() <= 1e-5 and (g_ours - g_stock).abs().max().item() <= 1e-5
    assert g_ours.abs().max().item() > 1e-4


# ---------------------------------------------------------------- residual-block checkpointing (block_checkpoint)


@pytest.mark.parametrize("every", [1, 0])
def test_block_checkpoint_is_exact_and_lowers_the_backward_peak(vae, latents, every):
    """Each residual block as a nested checkpoint inside its chunk: frames and encoded latents
    bit for bit those without, gradients to float rounding (the per-frame norms' backward may
    reduce over channels in another vector blocking); the decode-and-encode backward's
    live-bytes peak is lower (a chunk's recomputation keeps only its blocks' inputs); the VAE
    is left unpatched."""
    from mogan_ds.plan.memory import LiveBytes

    weight = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(8))

    def run(block):
        z = latents.clone().requires_grad_(True)
        codec = ChunkedWanDecoder(vae, checkpoint_every=every, block_checkpoint=block)
        with LiveBytes() as lb:
            frames = codec.decode_window(z, 1, 3)
            lat = codec.encode(frames[:, :, : 4 * 2 + 1])
            lb.reset_peak()
            (lat * weight).sum().backward()
        return frames.detach(), lat.detach(), z.grad, lb.peak

    frames, lat, grad, peak = run(False)
    frames_b, lat_b, grad_b, peak_b = run(True)
    assert torch.equal(frames_b, frames) and torch.equal(lat_b, lat)
    torch.testing.assert_close(grad_b, grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())
    assert grad[:, :, 1:].abs().max().item() > 0
    assert peak_b < 0.8 * peak, (peak_b, peak)
    assert not any("forward" in vars(m) for m in vae.modules())


def test_norm_checkpoint_per_frame_is_exact_and_lowers_the_backward_peak():
    """`_per_frame_checkpoint`: the block's WanRMS_norm applied per frame under checkpoints gives
    the same output and (at a size past the kernels' vector tails) the same gradient, and its
    backward holds one frame's fp32 temporaries instead of the whole chunk's."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from mogan_ds.motion.chunked_decode import _per_frame_checkpoint
    from mogan_ds.plan.memory import LiveBytes

    norm = WanRMS_norm(32, images=False).to(torch.bfloat16)
    with torch.no_grad():
        norm.gamma.normal_(generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 32, 4, 32, 32, generator=gen).to(torch.bfloat16)
    w = torch.randn(x0.shape, generator=gen).to(torch.bfloat16)

    def run(fn):
        x = x0.clone().requires_grad_(True)
        with LiveBytes() as lb:
            y = fn(x)
            lb.reset_peak()
            (y * w).sum().backward()
        return y.detach(), x.grad, lb.peak - lb.live

    y, g, peak = run(norm)
    y_c, g_c, peak_c = run(_per_frame_checkpoint(norm.forward))
    assert torch.equal(y_c, y) and torch.equal(g_c, g)
    assert peak_c < 0.5 * peak, (peak_c, peak)


def test_block_checkpoint_comes_from_the_recipe(vae):
    from mogan_ds.config import load_config
    from mogan_ds.motion.pipeline import MotionPath

    for on in (False, True):
        cfg = load_config("tiny", ["gan.space=latent", f"gan.vae_block_checkpoint={str(on).lower()}"])
        codec = MotionPath.from_config(cfg.gan, cfg.latent_frames, vae).codec
        assert bool(codec._dec_blocks) == bool(codec._enc_blocks) == on
