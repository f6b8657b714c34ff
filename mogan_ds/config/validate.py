"""Checks of a config that need only the config and the architecture, run before any weight is read.

`validate` runs in the loader (config alone), in `python -m mogan_ds info` and in
`launch/train.py` before the networks are built (with the DiT's heads and layers from the
weights folder's config.json and the world size), so each bad combination is one line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ConfigError
from ..models.presets import PRESETS
from ..motion.window import WindowSpec
from .schema import _BOUND_OPS, Config, OptimConfig, range_text


def check_ranges(section: Any, prefix: str = "") -> None:
    """Every number of the tree against the range its field declares (`F(..., ge=...)`)."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
            continue
        bounds = f.metadata.get("range")
        if not bounds:
            continue
        entries = [(f"{key}[{i}]", x) for i, x in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for name, x in entries:
            if not all(_BOUND_OPS[op][0](x, b) for op, b in bounds.items()):
                raise ConfigError(f"{name}: {x!r} is out of range; must be {range_text(bounds)}")


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(
    cfg: Config, num_heads: int | None = None, world_size: int | None = None, num_layers: int | None = None
) -> None:
    """Every field's range (`check_ranges`), then the checks that involve more than one value.

    `num_heads`/`num_layers` (the DiT's, from `models.presets.architecture`) and
    `world_size` are checked when known: `info` knows the architecture, the trainer both.
    """
    check_ranges(cfg)
    v, s, g = cfg.video, cfg.schedule, cfg.gan
    _require(
        cfg.models.arch == "auto" or cfg.models.arch in PRESETS,
        "models.arch",
        f"unknown architecture preset {cfg.models.arch!r}; known: auto, {', '.join(PRESETS)}",
    )
    _require((v.num_frames - 1) % 4 == 0, "video.num_frames", f"must be 4k+1 for the Wan VAE, got {v.num_frames}")
    _require(v.height % 16 == 0, "video.height", f"must be a multiple of 16, got {v.height}")
    _require(v.width % 16 == 0, "video.width", f"must be a multiple of 16, got {v.width}")
    _require(len(s.denoising_timesteps) >= 1, "schedule.denoising_timesteps", "needs at least one entry")
    _require(
        all(t <= s.num_train_timesteps for t in s.denoising_timesteps),
        "schedule.denoising_timesteps",
        f"entries must lie in (0, {s.num_train_timesteps}]",
    )
    _require(
        list(s.denoising_timesteps) == sorted(s.denoising_timesteps, reverse=True),
        "schedule.denoising_timesteps",
        "must be in decreasing order",
    )
    _require(
        s.min_timestep < s.max_timestep <= s.num_train_timesteps,
        "schedule.min_timestep",
        f"need 0 <= min_timestep < max_timestep <= {s.num_train_timesteps}",
    )
    _require(
        g.disc_timestep <= s.num_train_timesteps,
        "gan.disc_timestep",
        f"{g.disc_timestep} is past the timestep grid's end schedule.num_train_timesteps={s.num_train_timesteps}",
    )
    _require(
        cfg.dmd.enabled or g.enabled,
        "dmd.enabled",
        "DMD and the GAN are both disabled: nothing would train the generator",
    )
    try:
        # The motion path's own window check (one place), so a recipe fails here, not at step 0.
        window = WindowSpec.from_config(g, cfg.latent_frames)
    except ValueError as e:
        key = "gan.window" if g.window_start == "random" else "gan.window_start"
        raise ConfigError(f"{key}: {e}") from None
    sp = cfg.parallel.sp_size
    if g.enabled and g.space == "flow" and g.split_over_sp and sp > 1:
        # motion.sp_split gives each SP rank a contiguous share of at least one chunk.
        _require(
            window.length >= sp,
            "gan.window",
            f"a window of {window.length} latent chunks cannot be split over parallel.sp_size={sp} "
            "sequence-parallel ranks (gan.split_over_sp): use gan.window >= parallel.sp_size or "
            "gan.split_over_sp=false",
        )
    _require(len(g.head_blocks) >= 1, "gan.head_blocks", "needs at least one block index")
    _require(
        all(b < g.disc_blocks for b in g.head_blocks),
        "gan.head_blocks",
        f"indices must lie in [0, gan.disc_blocks={g.disc_blocks})",
    )
    _require(len(set(g.head_blocks)) == len(g.head_blocks), "gan.head_blocks", "indices must be distinct")
    _require(list(g.head_blocks) == sorted(g.head_blocks), "gan.head_blocks", "indices must be increasing")
    _require(
        max(g.head_blocks) == g.disc_blocks - 1,
        "gan.head_blocks",
        f"the last head must follow the last block (gan.disc_blocks={g.disc_blocks}): blocks after it would never run",
    )
    if g.space == "flow":
        _require(
            v.height >= 128 and v.width >= 128, "video.height", "RAFT needs frames of at least 128x128 (gan.space=flow)"
        )
    for role in ("generator", "fake_score", "discriminator"):
        lora = getattr(cfg.models.lora, role)
        key = f"models.lora.{role}.target_modules"
        _require(len(lora.target_modules) >= 1, key, "needs at least one module name")
        _require(all(m.strip() for m in lora.target_modules), key, "module names must not be empty")
        _require(len(set(lora.target_modules)) == len(lora.target_modules), key, "module names must be distinct")
    for role in ("generator", "fake_score", "discriminator"):
        o: OptimConfig = getattr(cfg.optim, role)
        _require(len(o.betas) == 2, f"optim.{role}.betas", f"two values (beta1, beta2), got {len(o.betas)}")
    t = cfg.train
    _require(
        t.batch_size % t.micro_batch_size == 0,
        "train.batch_size",
        f"{t.batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}",
    )
    _require(
        g.disc_batch_size % t.micro_batch_size == 0,
        "gan.disc_batch_size",
        f"{g.disc_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}",
    )
    if num_heads is not None:
        _require(
            num_heads % cfg.parallel.sp_size == 0,
            "parallel.sp_size",
            f"{cfg.parallel.sp_size} does not divide the DiT's {num_heads} attention heads",
        )
    if num_layers is not None and g.enabled:
        _require(
            g.disc_blocks <= num_layers,
            "gan.disc_blocks",
            f"{g.disc_blocks} blocks asked of a DiT that has {num_layers}",
        )
    if world_size is not None:
        sp = cfg.parallel.sp_size
        _require(world_size % sp == 0, "parallel.sp_size", f"{sp} does not divide the world size {world_size}")
        dp = world_size // sp
        _require(
            t.batch_size % (t.micro_batch_size * dp) == 0,
            "train.batch_size",
            f"{t.batch_size} is not a multiple of micro_batch_size*dp = {t.micro_batch_size}*{dp}",
        )
        if g.enabled and g.disc_batch_size:
            _require(
                g.disc_batch_size % (t.micro_batch_size * dp) == 0,
                "gan.disc_batch_size",
                f"{g.disc_batch_size} is not a multiple of micro_batch_size*dp = {t.micro_batch_size}*{dp}",
            )
