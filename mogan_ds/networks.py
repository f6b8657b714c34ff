"""Every network of a MoGAN run, loaded from local folders and prepared for its role.

    generator      WanTransformer3DModel   <- models.generator (DMD-distilled) or the teacher
    fake_score     WanTransformer3DModel   <- the teacher's weights
    discriminator  MotionDiscriminator     <- the teacher's first gan.disc_blocks blocks + fresh heads
    teacher        WanTransformer3DModel   frozen replica (models.frozen_dtype)
    vae            AutoencoderKLWan        frozen replica; decoder run through the chunked decoder
    raft           torchvision RAFT        frozen replica, always fp32 (see `motion.flow.RaftFlow`)

Sequence parallelism is applied here, from outside, to the unmodified diffusers modules
(`mogan_ds.parallel`); the model code knows nothing of it. Trainable networks are built
in fp32: the DeepSpeed engine casts them to the ds_config's precision.

Loading: diffusers has no `zero.Init` support, so each rank materialises the full models
before ZeRO-3 partitions them (3 x 1.3B fp32 ~ 17 GB host RAM per rank at 1.3B: fine; a
14B teacher would need zero.Init-aware loading).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config
from .models.builders import DTYPES, freeze, load_raft, load_transformer, load_vae, wan_paths
from .motion.discriminator import build_discriminator
from .parallel import (
    Gather,
    ModulePlan,
    configure_attention,
    install_ulysses_attention,
    parallelize_module,
    parallelize_wan,
    wan_plan,
)


@dataclass
class Networks:
    generator: torch.nn.Module
    fake_score: torch.nn.Module | None
    discriminator: torch.nn.Module | None
    teacher: torch.nn.Module | None
    vae: torch.nn.Module
    raft: torch.nn.Module | None


def build_networks(cfg: Config, topo, device: torch.device, disc_prompt: torch.Tensor) -> Networks:
    """Load and prepare every network this recipe uses (disabled phases load nothing extra)."""
    paths = wan_paths(cfg.models.root)
    frozen = DTYPES[cfg.models.frozen_dtype]
    teacher_path = paths["transformer"]
    gen_path = Path(cfg.models.generator) if cfg.models.generator else teacher_path

    generator = load_transformer(gen_path, torch.float32)
    fake_score = load_transformer(teacher_path, torch.float32) if cfg.dmd.enabled else None
    teacher = freeze(load_transformer(teacher_path, frozen), device) if cfg.dmd.enabled else None
    discriminator = None
    if cfg.gan.enabled:
        discriminator = build_discriminator(
            teacher_path, cfg.gan, disc_prompt, torch.float32, gradient_checkpointing=cfg.models.gradient_checkpointing
        )
    vae = freeze(load_vae(paths["vae"], frozen), device)
    raft = None
    if cfg.gan.enabled and cfg.gan.space == "flow":
        # fp32 whatever models.frozen_dtype says: torchvision's RAFT builds its coordinate
        # grids in fp32 and fails on its first call with half weights (5M parameters: free).
        raft = freeze(load_raft(cfg.models.raft, cfg.models.raft_arch, torch.float32), device)

    for dit in (generator, fake_score, teacher):
        if dit is not None:
            parallelize_wan(dit, topo)
    if teacher is not None:
        # Trainable networks get their kernel after deepspeed.initialize has cast them
        # (`configure_trainable_attention`): "auto" picks flash-attn only for half precision.
        configure_attention(teacher, cfg.models.attention_backend)
    if discriminator is not None:
        parallelize_discriminator(discriminator, topo)
    if cfg.models.gradient_checkpointing:
        generator.enable_gradient_checkpointing()
        if fake_score is not None:
            fake_score.enable_gradient_checkpointing()
    generator.train()
    if fake_score is not None:
        fake_score.train()
    if discriminator is not None:
        discriminator.train()
    return Networks(generator, fake_score, discriminator, teacher, vae, raft)


def configure_trainable_attention(engines, backend: str) -> None:
    """Attention kernel of each engine's (already precision-cast) DiT."""
    for role, engine in engines.items():
        configure_attention(engine.module.backbone if role == "discriminator" else engine.module, backend)


def parallelize_discriminator(disc: torch.nn.Module, topo):
    """Ulysses SP for the motion discriminator: its backbone's own split points, gathered at the heads.

    Tokens are sharded where the Wan backbone declares (`_cp_plan`: block 0's input, the
    RoPE tables) and each prediction head receives the full token sequence (its query
    token attends over all of them), so heads and the final MLP see exactly what they
    would at sp=1. No-op at sp=1.
    """
    handle = install_ulysses_attention(disc.backbone, topo)
    plan = {
        **wan_plan(disc.backbone, prefix="backbone", gather_output=False),
        "heads.*": ModulePlan(inputs={0: Gather(1)}),
    }
    return handle.extend(parallelize_module(disc, plan, topo))
