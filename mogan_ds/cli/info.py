"""`python -m mogan_ds info`: the resolved config and a meta-device plan of every network.

Networks are built on the meta device (no memory, no weights) from the folders'
config.json when they exist, else from the recipe's `models.arch` preset, so a job can
be sized before its weights are on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from ..config import Config, dump_yaml, field_help, validate
from ..models.builders import DTYPES, build_raft
from ..models.lora import add_lora
from ..models.presets import architecture, transformer_limits
from ..motion.discriminator import MotionDiscriminator

# Mixed-precision AdamW under DeepSpeed: bf16 weight + bf16 grad + fp32 master + 2 fp32
# moments = 2 + 2 + 4 + 4 + 4 bytes per trainable parameter (ZeRO-3 splits it over DP).
TRAIN_STATE_BYTES = 16


@dataclass
class NetworkPlan:
    name: str
    params: int
    dtype: str
    trainable: bool
    source: str
    # A LoRA role (models.lora.<role>): the parameters that train (its adapters; the discriminator's
    # fresh heads too), the rest a frozen base in `dtype`. None: every parameter trains.
    trained_params: int | None = None
    # The fake score's adapters on the teacher's own base (share_teacher_base): the base is the teacher's row.
    shares_base: bool = False

    @property
    def trained(self) -> int:
        return self.params if self.trained_params is None else self.trained_params

    @property
    def weight_bytes(self) -> int:
        return self.params * torch.finfo(DTYPES[self.dtype]).bits // 8

    @property
    def train_state_bytes(self) -> int:
        return self.trained * TRAIN_STATE_BYTES if self.trainable else 0

    @property
    def resident_bytes(self) -> int:
        """Train state plus a LoRA role's frozen base (none when the base is the teacher's), or a frozen network's weights."""
        if not self.trainable:
            return self.weight_bytes
        base = 0 if self.shares_base else (self.params - self.trained) * torch.finfo(DTYPES[self.dtype]).bits // 8
        return self.train_state_bytes + base


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _strip_meta_keys(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def plan_networks(cfg: Config, trainable_dtype: str = "bf16") -> tuple[list[NetworkPlan], str]:
    """Every network of a MoGAN run, built on the meta device."""
    arch, source = architecture(cfg.models)
    tcfg = _strip_meta_keys(arch["transformer"])
    frozen = cfg.models.frozen_dtype
    with torch.device("meta"):
        dit = _count(WanTransformer3DModel.from_config(tcfg))
        vae = _count(AutoencoderKLWan.from_config(_strip_meta_keys(arch["vae"])))
        enc_cfg = {k: v for k, v in _strip_meta_keys(arch["text_encoder"]).items() if k in UMT5Config().to_dict()}
        text = _count(UMT5EncoderModel(UMT5Config(**enc_cfg)))
        raft = _count(build_raft(arch["raft_arch"]))
        disc_module = _meta_discriminator(cfg, tcfg)
        disc = _count(disc_module)
        lora = {r: _lora_counts(cfg, r, tcfg, disc_module) for r in ("generator", "fake_score", "discriminator")}

    def trainable(name: str, params: int, enabled: bool, src: str) -> NetworkPlan:
        counts = lora[name]
        if counts is None:
            return NetworkPlan(name, params, trainable_dtype, enabled, src)
        adapters, trained = counts
        settings = getattr(cfg.models.lora, name)
        shared = name == "fake_score" and settings.share_teacher_base
        base = "the teacher's base (shared)" if shared else f"frozen {trainable_dtype} base"
        note = f"{src}; LoRA r={settings.rank}: {adapters:,} adapter parameters on {base}"
        return NetworkPlan(name, params + adapters, trainable_dtype, enabled, note, trained, shared)

    plans = [
        trainable("generator", dit, True, source),
        trainable("fake_score", dit, cfg.dmd.enabled, source),
        NetworkPlan("teacher", dit, frozen, False, source),
        trainable("discriminator", disc, cfg.gan.enabled, f"{source}, first {cfg.gan.disc_blocks} blocks + heads"),
        NetworkPlan("vae", vae, frozen, False, source),
        NetworkPlan("raft", raft, "fp32", False, arch["raft_arch"]),  # RAFT always runs in fp32 (networks.py)
        NetworkPlan("text_encoder", text, frozen, False, f"{source} (offline: data_tools/encode_prompts.py only)"),
    ]
    return plans, source


def _lora_counts(cfg: Config, role: str, tcfg: dict, disc: torch.nn.Module) -> tuple[int, int] | None:
    """(adapter parameters, trained parameters) of a LoRA role, injected as the trainer does (on the meta
    device), or None when the role trains in full. The discriminator's trained parameters include its heads."""
    settings = getattr(cfg.models.lora, role)
    if not settings.enabled:
        return None
    module = disc if role == "discriminator" else WanTransformer3DModel.from_config(tcfg)
    adapters = add_lora(module.backbone if role == "discriminator" else module, settings, cfg.train.seed, role)
    return adapters, sum(p.numel() for p in module.parameters() if p.requires_grad)


def _meta_discriminator(cfg: Config, tcfg: dict) -> torch.nn.Module:
    backbone = WanTransformer3DModel.from_config({**tcfg, "num_layers": cfg.gan.disc_blocks})
    prompt = torch.zeros(1, cfg.text.max_length, tcfg["text_dim"])
    return MotionDiscriminator(backbone, prompt, cfg.gan.head_blocks, cfg.gan.head_dim, cfg.gan.disc_timestep)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(plans: list[NetworkPlan]) -> str:
    rows = [f"{'network':<14} {'parameters':>15} {'dtype':>5} {'weights':>11} {'train state':>12}  source"]
    for p in plans:
        state = _gib(p.train_state_bytes) if p.trainable else "frozen"
        rows.append(f"{p.name:<14} {p.params:>15,} {p.dtype:>5} {_gib(p.weight_bytes):>11} {state:>12}  {p.source}")
    resident = [p for p in plans if p.name != "text_encoder"]
    # train state already includes the trainable weights (TRAIN_STATE_BYTES)
    total = sum(p.resident_bytes for p in resident)
    rows.append(
        f"training job total (text encoder excluded; ZeRO-3 divides train state, and the teacher's weights when it "
        f"is a ZeRO-3 inference engine - parallel.zero_stage.teacher, the default with ZeRO-3 JSONs - by the DP "
        f"size; `plan` gives per-rank figures): {_gib(total)}"
    )
    return "\n".join(rows)


def validate_for_architecture(cfg: Config) -> None:
    """The trainer's checks that need the DiT's shape (SP vs heads, D's blocks), without a world."""
    validate(cfg, **transformer_limits(cfg.models))


def run_info(cfg: Config, trainable_dtype: str = "bf16") -> str:
    validate_for_architecture(cfg)
    plans, _ = plan_networks(cfg, trainable_dtype)
    return f"# resolved config\n{dump_yaml(cfg)}\n# networks (meta device)\n{format_plan(plans)}"


def format_help_keys() -> str:
    """Every config key with its default, help, range and choices (`info --help-keys`)."""
    defaults = {}

    def walk(obj, prefix=""):
        for name, value in vars(obj).items():
            if hasattr(value, "__dataclass_fields__"):
                walk(value, f"{prefix}{name}.")
            else:
                defaults[f"{prefix}{name}"] = value

    walk(Config())
    return "\n".join(f"{key} = {defaults[key]!r}\n    {text}" for key, text in field_help().items() if key in defaults)
