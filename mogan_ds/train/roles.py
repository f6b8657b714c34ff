"""Each role's build decision, made once: its final DeepSpeed dict, its ZeRO stage, whether it is built partitioned.

Trainable roles (generator, fake score, discriminator) each get their own ZeRO engine from
the same `ds_configs/*.json`, with the role's optimiser, clipping and batch sizes merged in
by `ds_config_for`, and its ZeRO stage replaced by `parallel.zero_stage.<role>` when that is
set (e.g. ZeRO-2 for the generator and fake score, ZeRO-3 for D). The frozen teacher gets a
ZeRO-3 *inference* engine when its stage is 3 (`teacher_ds_config`), else it is a replica.

A role may train as a LoRA adapter on frozen base weights (``models.lora.<role>``, ZeRO-3
only); the fake score's adapter can sit on the teacher's own weights, and the teacher is then
that module with the adapter disabled (``models.lora.fake_score.share_teacher_base``): its plan
has no DeepSpeed dict and names the role whose base it runs (``shared_base``).

`plan_roles` turns a recipe, the JSON and the topology into one `RolePlan` per role; the
network builder (`networks.build_networks`: partitioned build or whole), the engine builder
(`engines.build_engines`: which dict each engine gets) and the planner (`plan.report`: the
model states and traffic of each stage) all read that plan and decide nothing themselves.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator

from ..config import Config, ConfigError, LoraRoleConfig, OptimConfig
from ..models.builders import DTYPES
from ..parallel import zero_config_fixups

ROLES = ("generator", "fake_score", "discriminator")

# Keys the recipe owns: a ds_config that sets them would silently disagree with it.
RECIPE_OWNED_KEYS = (
    "optimizer",
    "scheduler",
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


def load_ds_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ds_config: no DeepSpeed JSON at {p}")
    with open(p, encoding="utf-8") as fh:
        try:
            ds = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"--ds_config {p}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds_config {p}: expected a JSON object of DeepSpeed settings, got {type(ds).__name__}")
    clash = [k for k in RECIPE_OWNED_KEYS if k in ds]
    if clash:
        raise ConfigError(
            f"--ds_config {p} sets {clash}: these come from the recipe (optim.<role>.*, train.batch_size, "
            "train.micro_batch_size); remove them from the DeepSpeed JSON"
        )
    return ds


def _role_batch(cfg: Config, role: str) -> tuple[int, str]:
    """(global clips per update of `role`, the config key that sets it)."""
    if role == "discriminator" and cfg.gan.disc_batch_size > 0:
        return cfg.gan.disc_batch_size, "gan.disc_batch_size"
    return cfg.train.batch_size, "train.batch_size"


def role_batch_size(cfg: Config, role: str) -> int:
    """Global clips per update of `role`: train.batch_size, or gan.disc_batch_size for D (0 = the same)."""
    return _role_batch(cfg, role)[0]


def gradient_accumulation_steps(cfg: Config, dp_size: int, role: str = "generator") -> int:
    """Micro steps per update of `role` on each data-parallel rank."""
    batch, key = _role_batch(cfg, role)
    per_step = cfg.train.micro_batch_size * dp_size
    if batch % per_step:
        raise ConfigError(f"{key}: {batch} is not a multiple of micro_batch_size*dp = {per_step}")
    return batch // per_step


def _on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def role_zero_stage(role: str, cfg: Config, base: dict) -> int:
    """The ZeRO stage `role`'s engine runs: `parallel.zero_stage.<role>`, or the JSON's when that is 0."""
    stage = int(getattr(cfg.parallel.zero_stage, role))
    return stage if stage else int(base.get("zero_optimization", {}).get("stage", 0))


def _apply_role_stage(role: str, cfg: Config, ds: dict, topo) -> None:
    """Set `parallel.zero_stage.<role>` in `ds` (in place), refusing what that stage cannot run.

    Why per role: the generator and fake score are small enough at 1.3B that ZeRO-2 (full bf16
    weights on every rank, partitioned gradients and optimizer states) fits, and it replaces
    ZeRO-3's all-gather of every layer at every forward - the backward simulation runs the
    generator up to 3 times per sample - with one all-gather of the updated weights per
    optimizer step. The discriminator and anything else can stay on the JSON's stage 3.
    """
    stage = getattr(cfg.parallel.zero_stage, role)
    if not stage:
        return
    key = f"parallel.zero_stage.{role}"
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = stage
    if stage < 3:
        if topo.sp_size > 1:
            # zero_config_fixups would refuse it too; name the recipe key instead of the JSON's.
            raise ConfigError(
                f"{key}={stage} with parallel.sp_size={topo.sp_size}: sequence parallelism needs ZeRO stage 3 "
                "(stages 0-2 sum the gradients over the SP group instead of averaging them)"
            )
        if role == "generator" and cfg.eval.every > 0 and cfg.train.ema_decay > 0:
            # ema.compute_swapped_in maps the EMA shard onto ZeRO-3 compute partitions; a ZeRO-1/2
            # rank's shard covers only its optimizer fragment: refused here rather than mid-run.
            raise ConfigError(
                f"{key}={stage} with eval.every > 0 and train.ema_decay > 0: in-training evaluation samples "
                "with the EMA swapped into the generator's ZeRO-3 partitions; keep the generator at stage 3 "
                "or set eval.every=0"
            )
        if str(zero.get("offload_param", {}).get("device", "none")) != "none":
            raise ConfigError(
                f"{key}={stage}: the DeepSpeed JSON offloads parameters (zero_optimization.offload_param), "
                "which only ZeRO stage 3 supports; use a JSON without it or stage 3 for this role"
            )


def ds_config_for(role: str, cfg: Config, base: dict, topo) -> dict:
    """The final DeepSpeed dict of one role: the JSON + the role's ZeRO stage + the recipe's optimiser/batch values."""
    o: OptimConfig = getattr(cfg.optim, role)
    ds = copy.deepcopy(base)
    _apply_role_stage(role, cfg, ds, topo)
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = gradient_accumulation_steps(cfg, topo.dp_size, role)
    ds["train_batch_size"] = role_batch_size(cfg, role)
    ds["gradient_clipping"] = o.grad_clip
    params = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if _on_cpu() or not cfg.optim.fused_adam:
        # FusedAdam is a CUDA kernel, compiled by DeepSpeed at first use (nvcc + ninja); on the
        # CPU accelerator, or on a GPU machine where that build cannot run, torch's AdamW (same maths).
        params["torch_adam"] = True
    ds["optimizer"] = {"type": "AdamW", "params": params}
    if o.warmup_steps > 0:
        ds["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": o.lr,
                "warmup_num_steps": o.warmup_steps,
                "warmup_type": "linear",
            },
        }
    return zero_config_fixups(ds, topo)


# Training-only sections a frozen engine must not carry (it has no optimizer and no gradients).
_TRAINING_ONLY_ZERO_KEYS = ("offload_optimizer",)
# ZeRO options that would change the frozen teacher's values (quantised weights) or that its
# partitioned build cannot honour (fp32-kept modules in an NVMe-swapped partition).
_TEACHER_REFUSED = {
    "zero_quantized_weights": "quantises the gathered weights, so the teacher would not compute with its own values",
    "zero_quantized_nontrainable_weights": "quantises frozen weights, so the teacher would not compute with its "
    "own values",
}


def teacher_zero3(cfg: Config, base: dict | None) -> bool:
    """Whether the frozen teacher runs as a ZeRO-3 inference engine (its stage, or the JSON's when 0, is 3)."""
    return cfg.dmd.enabled and base is not None and role_zero_stage("teacher", cfg, base) == 3


def teacher_ds_config(cfg: Config, base: dict, topo) -> dict:
    """The final DeepSpeed dict of the frozen teacher's ZeRO-3 inference engine.

    The JSON's ``zero_optimization`` at stage 3 (prefetch, persistence threshold, live
    parameters and ``offload_param`` as the JSON sets them) without the optimizer's offload;
    no optimizer, scheduler or clipping; precision from ``models.frozen_dtype`` (bf16 ->
    ``bf16.enabled``, fp32 -> neither bf16 nor fp16), whatever the JSON trains in; batch
    sizes those of the generator's DMD update, the phase that runs it (DeepSpeed checks
    them even without an optimizer). Refused, naming the key: quantised weights (the
    teacher would not compute with its own values) and parameters offloaded to NVMe (the
    fp32-kept modules of a half-precision teacher are re-typed in their partitions before
    loading, which a swapped-out partition does not allow).
    """
    stage = role_zero_stage("teacher", cfg, base)
    if stage != 3:
        raise ConfigError(
            f"parallel.zero_stage.teacher: the teacher runs ZeRO stage {stage} (a replica); only stage 3 builds an engine"
        )
    ds = {k: copy.deepcopy(v) for k, v in base.items() if k not in ("fp16", "bf16", "amp", "torch_autocast")}
    zero = {k: v for k, v in ds.get("zero_optimization", {}).items() if k not in _TRAINING_ONLY_ZERO_KEYS}
    zero["stage"] = 3
    for key, why in _TEACHER_REFUSED.items():
        if zero.get(key):
            raise ConfigError(f"zero_optimization.{key} with the ZeRO-3 teacher (parallel.zero_stage.teacher): {why}")
    if str(zero.get("offload_param", {}).get("device", "none")) == "nvme":
        raise ConfigError(
            "zero_optimization.offload_param.device=nvme with the ZeRO-3 teacher (parallel.zero_stage.teacher): "
            "its fp32-kept modules cannot be re-typed in swapped-out partitions; offload to cpu, or set "
            "parallel.zero_stage.teacher=1 for a replica"
        )
    ds["zero_optimization"] = zero
    ds.pop("checkpoint", None)  # nothing to load: the teacher is rebuilt from its weights folder
    if cfg.models.frozen_dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = gradient_accumulation_steps(cfg, topo.dp_size)
    ds["train_batch_size"] = cfg.train.batch_size
    return zero_config_fixups(ds, topo, trainable=False)


@dataclass(frozen=True)
class RolePlan:
    """How one role is built and run.

    role: generator | fake_score | discriminator | teacher.
    ds_config: the role's final DeepSpeed dict (None: no engine: a replicated teacher, or no
        JSON given, as when networks are built outside a training run; the teacher on the
        fake score's shared base).
    stage: the ZeRO stage that dict runs (0 without one; the shared teacher: its host's).
    partitioned: built under ``deepspeed.zero.Init`` and loaded tensor by tensor into its
        partitions (trainable roles: ``models.zero_init`` and stage 3, or a shared base at
        stage 3; the teacher: stage 3), instead of materialising the whole network on every
        rank first.
    trainable: gets an optimizer (the teacher never does).
    lora: the role's adapter settings (``models.lora.<role>``) when it trains as a LoRA
        adapter on frozen base weights, else None.
    shared_base: the fake score: "teacher" when its base is the teacher's weights built as the
        teacher is (``models.lora.fake_score.share_teacher_base``); the teacher: "fake_score"
        when it is that base run with the adapter disabled (no module or engine of its own).
    """

    role: str
    ds_config: dict | None
    stage: int
    partitioned: bool
    trainable: bool
    lora: LoraRoleConfig | None = None
    shared_base: str | None = None

    def offloads(self, what: str) -> bool:
        """Whether ``zero_optimization.offload_<what>`` (optimizer | param) goes to cpu or nvme."""
        zero = (self.ds_config or {}).get("zero_optimization", {})
        return str(zero.get(f"offload_{what}", {}).get("device", "none")) in ("cpu", "nvme")


def roles_in_use(cfg: Config) -> tuple[str, ...]:
    """The roles this recipe runs: the generator always, the fake score and teacher with DMD, D with the GAN."""
    used = {"generator": True, "fake_score": cfg.dmd.enabled, "discriminator": cfg.gan.enabled}
    return tuple(r for r in ROLES if used[r]) + (("teacher",) if cfg.dmd.enabled else ())


def plan_roles(cfg: Config, base: dict | None, topo) -> dict[str, RolePlan]:
    """One `RolePlan` per role in use (`roles_in_use`), from the recipe, the DeepSpeed JSON and the topology.

    Without a JSON (``base=None``) no role has a dict and every network is built whole.
    Raises `ConfigError` (naming the key) when a role's stage cannot run its settings.
    """
    plans = {}
    for role in roles_in_use(cfg):
        if role == "teacher":
            host = plans.get("fake_score")
            if host is not None and host.shared_base:
                # The fake score's frozen base with its adapter disabled: nothing of its own to build.
                plans[role] = RolePlan(role, None, host.stage, False, trainable=False, shared_base=host.role)
                continue
            ds = teacher_ds_config(cfg, base, topo) if teacher_zero3(cfg, base) else None
            plans[role] = RolePlan(role, ds, 3 if ds else 0, ds is not None, trainable=False)
            continue
        ds = ds_config_for(role, cfg, base, topo) if base is not None else None
        stage = int(ds.get("zero_optimization", {}).get("stage", 0)) if ds else 0
        lora = lora_settings(cfg, role)
        shared = role == "fake_score" and lora is not None and lora.share_teacher_base
        if lora is not None and ds is not None:
            _check_lora_role(cfg, role, ds, stage, shared)
        partitioned = stage == 3 and (cfg.models.zero_init or shared)
        plans[role] = RolePlan(
            role, ds, stage, partitioned, trainable=True, lora=lora, shared_base="teacher" if shared else None
        )
    return plans


def lora_settings(cfg: Config, role: str) -> LoraRoleConfig | None:
    """``models.lora.<role>`` when that role trains as a LoRA adapter (enabled), else None."""
    lora = getattr(cfg.models.lora, role, None)
    return lora if lora is not None and lora.enabled else None


def ds_precision(ds: dict | None) -> torch.dtype:
    """The dtype a DeepSpeed dict trains in: bf16 or fp16 when enabled, else fp32."""
    if ds and ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds and ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def _check_lora_role(cfg: Config, role: str, ds: dict, stage: int, shared: bool) -> None:
    """What a LoRA role needs of its engine: ZeRO stage 3 (frozen partitioned base, partitioned adapters);
    a base shared with the teacher also the teacher's precision, models.frozen_dtype."""
    if stage != 3:
        raise ConfigError(
            f"models.lora.{role}.enabled with ZeRO stage {stage} for the {role} (parallel.zero_stage.{role} or the "
            "DeepSpeed JSON): LoRA roles run as ZeRO-3 engines (frozen base partitioned, adapters trained); "
            "use stage 3"
        )
    if shared:
        frozen, trained = DTYPES[cfg.models.frozen_dtype], ds_precision(ds)
        if frozen != trained:
            raise ConfigError(
                f"models.lora.fake_score.share_teacher_base with models.frozen_dtype={cfg.models.frozen_dtype} and a "
                f"DeepSpeed JSON that trains in {str(trained).replace('torch.', '')}: the shared base is one copy, "
                "the teacher's and the fake score's at once; set models.frozen_dtype to the JSON's precision or "
                "models.lora.fake_score.share_teacher_base=false"
            )
