"""Every network of a MoGAN run, loaded from local folders and prepared for its role.

    generator      WanTransformer3DModel   <- models.generator (DMD-distilled) or the teacher
    fake_score     WanTransformer3DModel   <- the teacher's weights
    discriminator  MotionDiscriminator     <- the teacher's first gan.disc_blocks blocks + fresh heads
    teacher        WanTransformer3DModel   frozen (models.frozen_dtype): ZeRO-3 partitions or a replica, or
                                           the fake score's own base with its adapter off (shared, LoRA)
    vae            AutoencoderKLWan        frozen replica; decoder run through the chunked decoder
    raft           torchvision RAFT        frozen replica, always fp32 (see `motion.flow.RaftFlow`)

Sequence parallelism is applied here, from outside, to the unmodified diffusers modules
(`mogan_ds.parallel`); the model code knows nothing of it. Trainable networks are built
in fp32: the DeepSpeed engine casts them to the ds_config's precision.

Loading: with ``models.zero_init`` (default) each trainable network whose role's final
DeepSpeed dict is ZeRO stage 3 (its `roles.RolePlan` says ``partitioned``) is built under `deepspeed.zero.Init`
from its config and its safetensors are copied tensor by tensor into the partitions
(`mogan_ds.models.partitioned`): a rank holds 1/world of each such network, never the whole
(benchmarks/zero_init.py measures it). A role at ZeRO stage 0-2, or ``models.zero_init=false``,
materialises the full fp32 model on every rank before `deepspeed.initialize` partitions it
(3 x 1.3B fp32 ~ 17 GB host RAM per rank at 1.3B; 3 x 57 GB at 14B). Both ways give the
same weights (tests/test_zero_init.py).

The frozen teacher follows its own stage, `parallel.zero_stage.teacher` (0 = the JSON's):
at stage 3 (every shipped JSON) it is built the same way, partitioned from the start and
loaded tensor by tensor in ``models.frozen_dtype`` with diffusers' fp32-kept modules
(`load_partitioned_frozen_transformer`: the replica's values and dtypes), and becomes a
ZeRO-3 inference engine (`engines.build_teacher_engine`): 1/world of it per rank (at 14B,
~1.8 GB bf16 over 16 ranks instead of ~29 GB), gathered layer by layer in its forward. This
does not depend on ``models.zero_init``, which concerns the trainable networks. At stages 1-2
the teacher is a full replica on every rank, as the VAE and RAFT always are (small).
LoRA (``models.lora.<role>``, `mogan_ds.models.lora`): a role's base is built as above, then
its adapters are injected (whole, small) and, on a partitioned base, partitioned the same way
(`partition_adapters`); the base's parameters are frozen, so the engine trains the adapters
only. The discriminator's adapters go into its backbone; its fresh heads train in full. With
``models.lora.fake_score.share_teacher_base`` the fake score's base is the teacher itself,
built as the teacher is (partitioned at the fake score's ZeRO-3 stage, in the teacher's dtype
with diffusers' fp32-kept modules), and the teacher is that module with its adapter disabled
(`models.lora.AdapterOff`): no second copy, no teacher engine. Adapters are injected before the
sequence-parallel hooks, which therefore wrap the adapted modules.
The discriminator is built first, so its fresh heads draw the same random numbers whichever
way and whatever else the recipe loads; the other loads leave the global RNG untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from ..config import Config
from ..models.builders import (
    DTYPES,
    freeze,
    is_block_at_or_after,
    load_raft,
    load_transformer,
    load_vae,
    transformer_config,
    wan_paths,
)
from ..models.lora import AdapterOff, add_lora, partition_adapters
from ..models.partitioned import (
    PartitionedBuild,
    dropped,
    load_into_partitions,
    load_partitioned_frozen_transformer,
    load_partitioned_transformer,
    move_buffers,
    partition_rest,
)
from ..motion.discriminator import assemble_discriminator, build_discriminator
from ..parallel import (
    Gather,
    ModulePlan,
    configure_attention,
    install_ulysses_attention,
    parallelize_module,
    parallelize_wan,
    wan_plan,
)
from .roles import ROLES, RolePlan, lora_settings

log = logging.getLogger(__name__)


@dataclass
class Networks:
    generator: torch.nn.Module
    fake_score: torch.nn.Module | None
    discriminator: torch.nn.Module | None
    teacher: torch.nn.Module | None
    vae: torch.nn.Module
    raft: torch.nn.Module | None
    teacher_partitioned: bool = False  # ZeRO-3 partitions awaiting their inference engine (engines.build_engines)
    # The teacher is `models.lora.AdapterOff` of the fake score (its frozen base, adapter disabled): no module of its own.
    teacher_shared: bool = False


def build_networks(
    cfg: Config, topo, device: torch.device, disc_prompt: torch.Tensor, roles: dict[str, RolePlan] | None = None
) -> Networks:
    """Load and prepare every network this recipe uses (disabled phases load nothing extra).

    ``roles`` (`roles.plan_roles`, from the DeepSpeed JSON the engines are built from): a
    role whose plan says ``partitioned`` is built under zero.Init with its plan's dict and
    loaded into its partitions; without plans every network is built whole.
    Seed the global RNG first (the discriminator's fresh heads draw from it).
    """
    paths = wan_paths(cfg.models.root)
    frozen = DTYPES[cfg.models.frozen_dtype]
    teacher_path = paths["transformer"]
    gen_path = Path(cfg.models.generator) if cfg.models.generator else teacher_path
    roles = roles or {}
    role_ds = {r: p.ds_config for r, p in roles.items() if p.trainable and p.partitioned}
    teacher_plan = roles.get("teacher")
    teacher_partitioned = teacher_plan is not None and teacher_plan.partitioned
    # LoRA roles (models.lora.<role>): the plans' settings, or the recipe's when built without plans.
    lora = {r: roles[r].lora if r in roles else lora_settings(cfg, r) for r in ROLES}
    shared = cfg.dmd.enabled and lora["fake_score"] is not None and lora["fake_score"].share_teacher_base
    log.info("built under zero.Init (partitioned from the start): %s", ", ".join(role_ds) or "none")
    if any(lora.values()):
        log.info(
            "LoRA adapters on frozen bases: %s%s",
            ", ".join(r for r, v in lora.items() if v),
            "; the teacher is the fake score's base with its adapter off" if shared else "",
        )

    def adapt(role: str, module: torch.nn.Module, target: torch.nn.Module | None = None) -> torch.nn.Module:
        """Inject the role's adapters (into `target`, default the whole module) and partition them with it."""
        if lora[role] is not None:
            add_lora(module if target is None else target, lora[role], cfg.train.seed, role)
            if role in role_ds:
                partition_adapters(module, role_ds[role], topo)
        return module

    discriminator = None
    if cfg.gan.enabled:
        gc = cfg.models.gradient_checkpointing
        if "discriminator" in role_ds:
            discriminator = build_partitioned_discriminator(
                teacher_path, cfg.gan, disc_prompt, role_ds["discriminator"], topo, gc
            )
        else:
            discriminator = build_discriminator(
                teacher_path, cfg.gan, disc_prompt, torch.float32, gradient_checkpointing=gc
            )
        # Only the backbone is adapted: the fresh heads train in full. The adapters' draws come
        # from their own seed, so the heads' random numbers are what they are without LoRA.
        adapt("discriminator", discriminator, discriminator.backbone)

    def trainable(role: str, path: Path) -> torch.nn.Module:
        if role in role_ds:
            return load_partitioned_transformer(path, role_ds[role], topo)
        return load_transformer(path, torch.float32)

    with torch.random.fork_rng(devices=[]):  # random inits overwritten by the weights: no trace in the RNG
        generator = adapt("generator", trainable("generator", gen_path))
        fake_score, teacher = None, None
        if shared:
            # One base for both: built as the teacher is (its dtype and fp32-kept modules), then adapted.
            if "fake_score" in role_ds:
                base = load_partitioned_frozen_transformer(teacher_path, role_ds["fake_score"], topo)
            else:
                base = load_transformer(teacher_path, frozen).requires_grad_(False)
            fake_score = adapt("fake_score", base)
            teacher = AdapterOff(fake_score)
        elif cfg.dmd.enabled:
            fake_score = adapt("fake_score", trainable("fake_score", teacher_path))
            if teacher_partitioned:
                teacher = load_partitioned_frozen_transformer(teacher_path, teacher_plan.ds_config, topo)
            else:
                teacher = freeze(load_transformer(teacher_path, frozen), device)
        vae = freeze(load_vae(paths["vae"], frozen), device)
        raft = None
        if cfg.gan.enabled and cfg.gan.space == "flow":
            # fp32 whatever models.frozen_dtype says: torchvision's RAFT builds its coordinate
            # grids in fp32 and fails on its first call with half weights (5M parameters: free).
            raft = freeze(load_raft(cfg.models.raft, cfg.models.raft_arch, torch.float32), device)

    for dit in (generator, fake_score, None if shared else teacher):  # a shared teacher runs the fake score's hooks
        if dit is not None:
            parallelize_wan(dit, topo)
    if teacher is not None and not shared:
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
    return Networks(generator, fake_score, discriminator, teacher, vae, raft, teacher_partitioned, shared)


def build_partitioned_discriminator(
    teacher_path, gan_cfg, prompt_embeds, ds_config: dict, topo, gradient_checkpointing: bool
) -> torch.nn.Module:
    """`build_discriminator` with the backbone ZeRO-3 partitioned as it is created (same values).

    The backbone (the teacher's first ``gan_cfg.disc_blocks`` blocks) is created under
    zero.Init and its weights loaded into its partitions; the blocks it does not build and
    the output head D drops stay unread. The fresh heads are built whole right after, as
    `build_discriminator` builds them (same random numbers: the backbone's construction
    consumed the same ones), then partitioned: `nn.MultiheadAttention` initialises a child's
    parameter from its own ``__init__``, which zero.Init would lose (`partition_rest`).
    Transient host memory: the heads, whole (3 heads at 14B width ~ 1.3 GB fp32).
    """
    n = gan_cfg.disc_blocks
    config = transformer_config(teacher_path, n)
    with PartitionedBuild(ds_config, topo):
        backbone = WanTransformer3DModel.from_config(config)
    model = assemble_discriminator(backbone, gan_cfg, prompt_embeds, None, gradient_checkpointing)
    partition_rest(model, ds_config, topo)
    move_buffers(model)
    load_into_partitions(
        model.backbone, teacher_path, allow_unused=lambda k: is_block_at_or_after(k, n) or dropped(model.backbone, k)
    )
    return model


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
