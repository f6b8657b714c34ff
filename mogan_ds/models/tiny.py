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
from .presets import RAFT_ARCH, TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE


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
