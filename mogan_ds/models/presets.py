"""Architecture presets: the network configs of known model families.

A run loads weights from folders; these presets describe the architectures *without*
weights so a job can be planned (parameter counts, memory) before the weights are on
disk (`python -m mogan_ds info`). When the folder exists its own config.json wins
(`architecture`, the one place a run's network shapes are resolved).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from ..errors import BadFileError, ConfigError
from .builders import MissingWeightsError


class ModelsChoice(Protocol):
    """What this module reads of `config.ModelsConfig` (structural, so config can import us)."""

    root: str
    arch: str
    raft_arch: str


def wan_dit(*, heads: int, text_dim: int, freq_dim: int, ffn_dim: int, num_layers: int, head_dim: int = 128) -> dict:
    """A Wan2.1 T2V DiT's `WanTransformer3DModel` config: the sizes given, the rest as every release sets it."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=freq_dim,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


# Wan2.1-T2V-1.3B-Diffusers: transformer/config.json, vae/config.json (AutoencoderKLWan
# defaults), text_encoder/config.json (umt5-xxl encoder).
WAN21_T2V_1_3B = {
    "transformer": wan_dit(heads=12, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30),
    "vae": {},
    "text_encoder": dict(
        vocab_size=256384,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    ),
    "raft_arch": "raft_large",
}

# Wan2.1-T2V-14B-Diffusers: transformer/config.json (40 heads x 128 = 5120 wide, ffn 13824,
# 40 layers; 14,288,491,584 parameters); the VAE and the umt5-xxl text encoder are the
# 1.3B's.
WAN21_T2V_14B = {
    **WAN21_T2V_1_3B,
    "transformer": {**WAN21_T2V_1_3B["transformer"], "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
}

# The tiny models (`tiny.py` writes them): a CPU step takes seconds while every dimension
# constraint of the real models holds (heads divisible by SP=2, RoPE splits, the VAE's 4x/8x).
TINY_TRANSFORMER = wan_dit(heads=4, head_dim=16, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=4)

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

TINY = {
    "transformer": TINY_TRANSFORMER,
    "vae": TINY_VAE,
    "text_encoder": TINY_TEXT_ENCODER,
    "raft_arch": RAFT_ARCH,
}

PRESETS = {"wan2.1-t2v-1.3b": WAN21_T2V_1_3B, "wan2.1-t2v-14b": WAN21_T2V_14B, "tiny": TINY}


# --------------------------------------------------------------------------- resolution

FOLDER_PARTS = ("transformer", "vae", "text_encoder")


def folder_config(folder: str | os.PathLike) -> dict | None:
    """A weights sub-folder's config.json, or None when there is none."""
    p = Path(folder) / "config.json"
    if not str(folder) or not p.is_file():
        return None
    try:
        with open(p, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadFileError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadFileError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data


def architecture(models: ModelsChoice) -> tuple[dict, str]:
    """The network configs of a run and where they came from (the config's `models` section).

    {'transformer', 'vae', 'text_encoder': config dicts, 'raft_arch': name}: the folders'
    config.json files when `models.root` has all three, else the `models.arch` preset.
    The one place the trainer (head/block counts before loading) and `info` (the meta
    plan) learn a model's shape from.
    """
    root = Path(models.root) if models.root else None
    found = {k: folder_config(root / k) if root else None for k in FOLDER_PARTS}
    if all(v is not None for v in found.values()):
        return {**found, "raft_arch": models.raft_arch}, f"folder {root}"
    if models.arch == "auto":
        missing = [k for k, v in found.items() if v is None]
        where = root or Path("<models.root unset>")
        raise MissingWeightsError(
            f"models.arch=auto needs {', '.join(str(where / m / 'config.json') for m in missing)}; "
            f"set models.root to the weights folder or models.arch to a preset ({', '.join(PRESETS)})"
        )
    if models.arch not in PRESETS:
        raise ConfigError(
            f"models.arch: unknown architecture preset {models.arch!r}; known: auto, {', '.join(PRESETS)}"
        )
    return {**PRESETS[models.arch], "raft_arch": models.raft_arch}, f"preset {models.arch}"


def transformer_limits(models: ModelsChoice) -> dict[str, int]:
    """{'num_heads', 'num_layers'} of the DiT: what `config.validate` checks SP and D against."""
    t = architecture(models)[0]["transformer"]
    return {"num_heads": int(t["num_attention_heads"]), "num_layers": int(t["num_layers"])}
