"""The paper recipe's precision path on CPU: bf16 frozen replicas (models.frozen_dtype=bf16)
and bf16 ZeRO-3 engines (ds_configs/zero3_bf16.json, which DeepSpeed's CPU accelerator runs),
so a dtype mismatch anywhere in an iteration fails here rather than on the cluster."""

import copy
import math

import pytest
import torch
from conftest import FAST

from mogan_ds.cli.launcher import REPO
from mogan_ds.config import load_config
from mogan_ds.metric_names import PROGRESS_BAR
from mogan_ds.models.builders import build_raft
from mogan_ds.motion.chunked_decode import ChunkedWanDecoder
from mogan_ds.motion.flow import RaftFlow

DS_BF16 = str(REPO / "ds_configs" / "zero3_bf16.json")  # the cluster's DeepSpeed JSON, unchanged


def _frames(dtype, seed=0):
    return (torch.rand(1, 3, 3, 128, 128, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)


def test_raft_loaded_in_bf16_runs_in_fp32_and_takes_bf16_frames():
    torch.manual_seed(0)
    raft = build_raft("raft_small").to(torch.bfloat16)  # what models.frozen_dtype=bf16 used to load
    flow_fn = RaftFlow(raft, num_iters=2, pairs_per_chunk=2)
    assert flow_fn.dtype == torch.float32
    frames = _frames(torch.bfloat16).requires_grad_(True)  # a bf16 VAE's decode
    flow = flow_fn(frames)
    assert flow.dtype == torch.float32 and flow.shape == (1, 2, 2, 128, 128) and torch.isfinite(flow).all()
    flow.square().mean().backward()
    assert frames.grad.dtype == torch.bfloat16 and torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0


@pytest.mark.parametrize("latent_dtype", [torch.float32, torch.bfloat16])
def test_chunked_codec_with_bf16_vae_and_fp32_or_bf16_latents(tiny_models, latent_dtype):
    from mogan_ds.models.builders import load_vae

    codec = ChunkedWanDecoder(load_vae(tiny_models / "wan" / "vae", torch.bfloat16))
    latents = torch.randn(1, 16, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(latent_dtype)
    latents.requires_grad_(True)
    frames = codec.decode_window(latents, 1, 2)
    assert frames.dtype == torch.bfloat16 and frames.shape == (1, 3, 8, 128, 128)
    # The motion tensor reaches the encoder in fp32 (RAFT's output); D gets fp32 latents.
    padded = torch.cat([frames[:, :, :1], frames], dim=2).float()  # 4w+1 frames, as MotionPath pads
    encoded = codec.encode(padded)
    assert encoded.dtype == torch.float32 and encoded.shape == (1, 16, 3, 16, 16)
    encoded.square().mean().backward()
    g = latents.grad
    assert g.dtype == latent_dtype and torch.isfinite(g).all()
    assert g[:, :, 1:].abs().sum() > 0 and not g[:, :, :1].any()  # truncated BPTT at the window start


def test_bf16_discriminator_returns_unrounded_fp32_logits(tiny_models):
    """Approximate R1/R2 need D(m) - D(m + sigma n): a logit rounded to bf16 (2^-8 relative)
    turns small gaps into exactly 0, so the final MLP computes in fp32."""
    from mogan_ds.motion.discriminator import build_discriminator

    cfg = load_config("tiny")
    torch.manual_seed(0)
    disc = build_discriminator(tiny_models / "wan" / "transformer", cfg.gan, torch.randn(1, 32, 32)).to(torch.bfloat16)
    x = torch.randn(4, 16, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = disc(x)
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, logits.bfloat16().float())  # not bf16 values upcast afterwards
    reference = copy.deepcopy(disc).float()  # the same (bf16-valued) weights computed in fp32 throughout
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(x.bfloat16().float()), rtol=0.05, atol=0.05)


@pytest.fixture(scope="module")
def bf16_trainer(tiny_workdir, tmp_path_factory):
    from mogan_ds.train.trainer import MoGANTrainer

    run = tmp_path_factory.mktemp("bf16_run")
    cfg = load_config(
        "tiny", [*tiny_workdir, f"output.run_dir={run}", *FAST, "logging.num_samples=1", "models.frozen_dtype=bf16"]
    )
    return MoGANTrainer(cfg, DS_BF16)


def test_paper_precision_iteration_runs_on_cpu(bf16_trainer):
    t = bf16_trainer
    # The premise: the paper recipe's dtypes (bf16 engines and frozen DiT/VAE; RAFT is fp32 by design).
    for role, engine in t.engines.items():
        assert next(engine.module.parameters()).dtype == torch.bfloat16, role
    # Frozen replicas are bf16 except the modules diffusers keeps in fp32 (norms, time embedder,
    # modulation tables), which stay fp32 as from_pretrained(torch_dtype=bf16) leaves them.
    keep = set(t.teacher._keep_in_fp32_modules)
    for name, p in t.teacher.named_parameters():
        want = torch.float32 if keep.intersection(name.split(".")) else torch.bfloat16
        assert p.dtype == want, name
    assert {p.dtype for p in t.vae.parameters()} == {torch.bfloat16}
    assert t.iteration.motion.raft.dtype == torch.float32

    logs = t.iteration.train_step(0)
    for phase in ("generator_dmd", "fake_score", "generator_gan", "discriminator"):
        assert logs[f"time_{phase}"] > 0, phase
    assert all(math.isfinite(v) for v in logs.values())
    # bf16 logits would round these finite differences to exactly 0 (R1/R2 off).
    assert logs["r1_gap"] > 0 and logs["r2_gap"] > 0
    assert set(PROGRESS_BAR) <= set(logs)


def test_paper_precision_samples_and_export(bf16_trainer):
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import load_file

    t = bf16_trainer
    t.step = 1
    t.write_samples()  # bf16 VAE decode + RAFT on the decoded uint8 frames
    videos = list((t.run_dir / "samples").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0
    out = t.export()
    exported = {}
    for f in sorted((out / "transformer").glob("*.safetensors")):
        exported |= load_file(str(f))
    for name, p in t.engines.generator.module.named_parameters():
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name], safe_get_full_fp32_param(p).cpu()), name
