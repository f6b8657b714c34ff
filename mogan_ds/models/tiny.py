"""Tiny random-initialised models of the real architectures, written with save_pretrained.

Tests and the demo load these through exactly the code path a real run takes
(`mogan_ds.models.builders`). The layout mirrors the public release:

    <out>/wan/          WanPipeline.save_pretrained: model_index.json, transformer/,
                        vae/, text_encoder/, tokenizer/ (byte-level, no vocab download),
                        scheduler/
    <out>/generator/    the few-step generator transformer (here: the teacher's weights,
                        i.e. the DMD warm-up starting point)
    <out>/raft_small.pth   torchvision raft_small state dict (random init)

Sizes are chosen so that a CPU step takes seconds while every dimension constraint of
the real models still holds (heads divisible by SP=2, RoPE splits, 4x temporal / 8x
spatial VAE compression, 16 latent channels).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

from .builders import build_raft

TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=128,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

TINY_VAE = dict(base_dim=12, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])

TINY_TEXT_ENCODER = dict(
    vocab_size=384,  # ByT5's 256 bytes + 3 specials + 125 sentinels
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
)

RAFT_ARCH = "raft_small"


def write_tiny_models(out: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny model set under `out`; returns `out`. Skips if already complete."""
    out = Path(out)
    done = out / ".complete"
    if done.exists() and not overwrite:
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**TINY_TRANSFORMER)
    vae = AutoencoderKLWan(**TINY_VAE)
    text_encoder = UMT5EncoderModel(UMT5Config(**TINY_TEXT_ENCODER))
    tokenizer = ByT5Tokenizer()
    # The public Wan2.1 release's scheduler (flow-prediction UniPC, shift 3 at 480p).
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    pipe.save_pretrained(out / "wan")
    transformer.save_pretrained(out / "generator")
    torch.save(build_raft(RAFT_ARCH).state_dict(), out / f"{RAFT_ARCH}.pth")
    done.write_text("ok\n")
    return out
