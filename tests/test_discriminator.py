"""The DiT motion discriminator, and the motion path that feeds it (tiny models, fp32, CPU)."""

import pytest
import torch

from mogan_ds.config import GANConfig
from mogan_ds.models import builders
from mogan_ds.motion.discriminator import MotionDiscriminator, build_discriminator

GAN = GANConfig(disc_blocks=3, head_blocks=[0, 1, 2], head_dim=16, disc_timestep=0)


@pytest.fixture(scope="module")
def teacher_path(tiny_models):
    return tiny_models / "wan" / "transformer"


@pytest.fixture(scope="module")
def prompt():
    return torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))  # [1, L, text_dim]


def _latents(b=2, t=2, seed=1, grad=False):
    return torch.randn(b, 16, t, 8, 8, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def _build(teacher_path, prompt, gan=GAN, **kw):
    torch.manual_seed(0)  # fresh heads, reproducibly
    return build_discriminator(teacher_path, gan, prompt, **kw)


def test_built_from_the_teachers_leading_blocks(teacher_path, prompt):
    d = _build(teacher_path, prompt)
    teacher = builders.load_transformer(teacher_path)  # 4 blocks
    assert len(d.backbone.blocks) == 3 and len(d.heads) == 3
    sd, td = d.backbone.state_dict(), teacher.state_dict()
    assert not any(k.startswith("blocks.3.") for k in sd)
    assert all(torch.equal(v, td[k]) for k, v in sd.items())
    # The DiT's output head is never run, so it is not kept as (gradient-less) parameters.
    assert d.backbone.proj_out is None and d.backbone.scale_shift_table is None
    assert torch.equal(d.prompt_embeds, prompt) and "prompt_embeds" in d.state_dict()


def test_heads_see_the_backbones_own_hidden_states(teacher_path, prompt):
    d = _build(teacher_path, prompt)
    teacher = builders.load_transformer(teacher_path)
    x = _latents()
    seen, ref = {}, {}
    hooks = [h.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0])) for i, h in enumerate(d.heads)]
    hooks += [b.register_forward_hook(lambda m, a, o, i=i: ref.__setitem__(i, o)) for i, b in enumerate(teacher.blocks)]
    with torch.no_grad():
        d(x)
        teacher(x, timestep=torch.zeros(2), encoder_hidden_states=prompt.expand(2, -1, -1))
    for h in hooks:
        h.remove()
    assert sorted(seen) == [0, 1, 2]
    for i in range(3):  # head i sits after block GAN.head_blocks[i] == i
        assert seen[i].shape == (2, 2 * 4 * 4, 64)  # [B, tokens, dim]
        assert (seen[i] - ref[i]).abs().max().item() <= 1e-5


def test_logits_and_every_parameter_gets_a_gradient(teacher_path, prompt):
    d = _build(teacher_path, prompt)
    x = _latents(grad=True)
    logits = d(x)
    assert logits.shape == (2,) and logits.dtype == torch.float32
    assert not torch.allclose(logits[0], logits[1])  # depends on the clip
    logits.sum().backward()
    assert x.grad.abs().sum() > 0
    missing = [n for n, p in d.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []  # ZeRO-3 needs every trainable parameter in the graph


def test_gradient_checkpointing_changes_nothing(teacher_path, prompt):
    x = _latents(grad=True)
    outs = []
    for ckpt in (False, True):
        d = _build(teacher_path, prompt, gradient_checkpointing=ckpt)
        assert d.backbone.gradient_checkpointing == ckpt
        y = d(x)
        (gx,) = torch.autograd.grad(y.sum(), x)
        outs.append((y.detach(), gx))
    assert (outs[0][0] - outs[1][0]).abs().max().item() <= 1e-5
    assert (outs[0][1] - outs[1][1]).abs().max().item() <= 1e-5


def test_checkpoint_round_trip(teacher_path, prompt, tmp_path):
    d = _build(teacher_path, prompt, gan=GANConfig(disc_blocks=2, head_blocks=[0, 1], head_dim=8, disc_timestep=250))
    d.save_pretrained(tmp_path / "d")
    back = MotionDiscriminator.from_pretrained(tmp_path / "d")
    assert back.config == d.config and back.timestep == 250 and back.head_blocks == [0, 1]
    x = _latents()
    with torch.no_grad():
        assert torch.equal(back(x), d(x))
    assert torch.equal(back.prompt_embeds, prompt)


def test_rejects_blocks_no_head_uses(teacher_path, prompt):
    with pytest.raises(ValueError, match="gan.disc_blocks=2"):
        _build(teacher_path, prompt, gan=GANConfig(disc_blocks=3, head_blocks=[0, 1], head_dim=8))
    with pytest.raises(ValueError, match="prompt embedding"):
        _build(teacher_path, torch.randn(1, 8, 7))


# --------------------------------------------------------------------------- the motion path


@pytest.fixture(scope="module")
def path_parts(tiny_models):
    vae = builders.load_vae(tiny_models / "wan" / "vae")
    raft = builders.load_raft(tiny_models / "raft_small.pth", "raft_small")
    return vae, raft


def test_flow_path_end_to_end(path_parts, teacher_path, prompt):
    from mogan_ds.motion.pipeline import MotionPath
    from mogan_ds.motion.window import Window

    vae, raft = path_parts
    gan = GANConfig(raft_iters=2, raft_pairs_per_chunk=2, flow_scale=20.0, window=1)
    path = MotionPath.from_config(gan, 3, vae, raft)
    # 32x32 pixels keep the decoder cheap; RaftFlow resizes them to RAFT's 128x128 minimum.
    z = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    fake = path.fake(z, Window(1, 1))
    assert fake.frames.shape == (1, 3, 4, 32, 32)  # latent chunk 1 -> pixel frames 1..4
    assert fake.flow.shape == (1, 2, 3, 32, 32) and fake.motion.shape == (1, 3, 4, 32, 32)
    assert fake.d_input.shape == (1, 16, 1, 4, 4)  # w latent frames, whatever the start
    logit = _build(teacher_path, prompt)(fake.d_input)
    logit.sum().backward()
    assert z.grad[:, :, 1].abs().sum() > 0  # through D, the VAE encoder, RAFT and the decoder
    assert z.grad[:, :, 0].abs().sum() == 0 and z.grad[:, :, 2].abs().sum() == 0  # truncated BPTT, early stop
    # Real clips take the same road without gradient: a whole clip whose window frames are the
    # fake's decoded pixels gives an identical D input.
    clip = torch.zeros(1, 3, 9, 32, 32)
    clip[:, :, 1:5] = fake.frames.detach()
    real = path.real(clip, Window(1, 1))
    assert not real.d_input.requires_grad and torch.equal(real.frames, clip[:, :, 1:5])
    assert (real.d_input - fake.d_input.detach()).abs().max().item() <= 1e-5
    # A window starting at chunk 0 spans 4w-3 frames (no padding needed) and also gives w latent frames.
    with torch.no_grad():
        assert path.encode_frames(torch.zeros(1, 3, 5, 32, 32)).shape == (1, 16, 2, 4, 4)
    with pytest.raises(ValueError, match="4w or 4w-3"):
        path.encode_frames(torch.zeros(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match="needs 9 frames"):
        path.real(clip[:, :, :8], Window(2, 1))
    g = torch.Generator().manual_seed(0)
    assert {path.draw_window(g).start for _ in range(32)} == {1, 2}  # never the 1-frame chunk 0


def test_window_spec_parses_checks_and_draws():
    from mogan_ds.motion.window import Window, WindowSpec

    spec = WindowSpec.from_config(GANConfig(window=12), 13)
    g = torch.Generator().manual_seed(0)
    starts = [spec.draw(g).start for _ in range(64)]
    assert set(starts) == {0, 1}
    assert spec.draw(torch.Generator().manual_seed(0)).start == starts[0]  # seeded: every rank draws alike
    assert WindowSpec.from_config(GANConfig(window=4, window_start="3"), 13).draw() == Window(3, 4)
    # the starts every draw, the config check and the toy's D probe use
    assert spec.starts() == range(0, 2)
    assert WindowSpec.from_config(GANConfig(window=4, window_start="3"), 13).starts() == range(3, 4)
    assert WindowSpec.from_config(GANConfig(window=1), 13).starts() == range(1, 13)  # flow: never chunk 0 alone
    assert Window(1, 12).frames == (1, 49) and Window(0, 13).frames == (0, 49) and Window(2, 2).context_frames == 13
    with pytest.raises(ValueError, match="does not fit"):
        WindowSpec.from_config(GANConfig(window=4, window_start="10"), 13)
    with pytest.raises(ValueError, match="'random' or an integer"):
        WindowSpec.from_config(GANConfig(window=4, window_start="first"), 13)
    with pytest.raises(ValueError, match="does not fit"):
        WindowSpec.from_config(GANConfig(window=14), 13)
    # flow space: a one-chunk window never starts at chunk 0 (a single frame has no flow) ...
    with pytest.raises(ValueError, match="allowed starts 1"):
        WindowSpec.from_config(GANConfig(window=1, window_start="0"), 3)
    # ... while the latent space may start anywhere.
    assert WindowSpec.from_config(GANConfig(space="latent", window=1, window_start="0"), 3).draw() == Window(0, 1)


def test_latent_path_slices_the_whole_clip_encoding(path_parts):
    """gan.space=latent: the real clip's window equals the slice of its full encoding, for every
    start: the same layout as the generator's whole-clip latents (no window-only artefact)."""
    from mogan_ds.motion.pipeline import MotionPath
    from mogan_ds.motion.window import Window

    vae, _ = path_parts
    path = MotionPath.from_config(GANConfig(space="latent", window=2), 4, vae, None)
    z = torch.randn(1, 16, 4, 4, 4, requires_grad=True)
    fake = path.fake(z, Window(1, 2))
    assert fake.flow is None and torch.equal(fake.d_input, z[:, :, 1:3])
    clip = torch.rand(1, 3, 13, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        full = path.codec.encode(clip)  # [1, 16, 4, 4, 4]
    for window in (Window(s, w) for w in (1, 2, 3) for s in range(0, 5 - w)):
        real = path.real(clip, window)
        assert torch.allclose(real.d_input, full[:, :, window.start : window.stop], rtol=0, atol=1e-5), window
    # The old construction (encode only the window's frames) differs: the test can tell them apart.
    first, stop = Window(2, 2).frames
    with torch.no_grad():
        alone = path.encode_frames(clip[:, :, first:stop])
    assert (alone - full[:, :, 2:4]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs the RAFT"):
        MotionPath.from_config(GANConfig(space="flow"), 4, vae, None)
