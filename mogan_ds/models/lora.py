"""Low-rank adapters (peft LoRA) on the Wan DiT roles: injection, the shared teacher base, merge and export.

A role with ``models.lora.<role>.enabled`` trains ``W + (alpha / r) B A`` on each targeted
Linear layer (`add_lora`, peft's `inject_adapter_in_model`): the base weights W are frozen
(``requires_grad`` False), A starts as peft draws it (Kaiming-uniform, from a CPU generator
seeded per role: the same on every rank and whichever way the base was built) and B at zero,
so at step 0 every adapted role computes exactly what its base computes.

ZeRO-3: the base is built as before (partitioned under ``zero.Init`` and loaded tensor by
tensor), the adapters are injected afterwards, whole (small), and then partitioned like any
module built outside the ``zero.Init`` context (`models.partitioned.partition_rest`: cast
to the engine's dtype, broadcast from the group's first rank, partitioned). The engine is
given only the adapter parameters, so only they get gradients, fp32 masters and Adam
moments; the frozen base is gathered layer by layer in the forward like the teacher's.

The fake score's adapter can sit on the teacher's own weights (`AdapterOff`): the teacher is
the fake score's module with every adapter disabled, run under no_grad in eval mode; one
copy of the base per rank instead of two.

Checkpoints and exports hold the adapters only; `merge_lora` folds them into the base
weights (``W + (B @ A) * alpha / r`` in fp32, peft's `get_delta_weight` order) for a plain
diffusers transformer, and `write_peft_adapter` writes them alone in peft's format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ..errors import ConfigError

ADAPTER = "default"  # peft's adapter name: the module's parameters are <layer>.lora_{A,B}.default.weight
_LORA_PARAM = re.compile(r"^(?P<layer>.+)\.lora_(?P<ab>[AB])\.default\.weight$")
PEFT_WEIGHTS = "adapter_model.safetensors"  # PeftModel.save_pretrained's names
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' load_lora_weights / load_lora_adapter


def peft_config(lora):
    """peft's `LoraConfig` of a ``models.lora.<role>`` section (B initialised to zero, no bias adapters)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        init_lora_weights=True,
        bias="none",
    )


def scaling(lora) -> float:
    """alpha / r: the factor of B A in the adapted weight (peft's ``scaling``)."""
    return lora.alpha / lora.rank


def lora_seed(seed: int, role: str) -> int:
    """The seed of a role's adapter initialisation (A), from ``train.seed``: the same on every rank."""
    return int.from_bytes(hashlib.sha256(f"lora/{role}/{seed}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def add_lora(model: torch.nn.Module, lora, seed: int, role: str) -> int:
    """Inject ``lora``'s adapters into `model` in place and freeze everything else of it; returns the adapter count.

    `model` may be ZeRO-3 partitioned (peft reads each Linear's ``in_features`` /
    ``out_features``, not its weight) or on the meta device (the planner). The adapters are
    created whole, in the base layer's dtype and on its device; partition them afterwards
    (`partition_adapters`). Only `model`'s own parameters are frozen: a caller that injects
    into a submodule (the discriminator's backbone) keeps the rest trainable.
    Raises `ConfigError` naming ``models.lora.<role>.target_modules`` for an entry that
    matches no module or a module peft cannot adapt.
    """
    from peft import inject_adapter_in_model

    names = [n for n, _ in model.named_modules()]
    key = f"models.lora.{role}.target_modules"
    for target in lora.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ConfigError(f"{key}: {target!r} matches no module of the {role}'s {type(model).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora_seed(seed, role))
        try:
            inject_adapter_in_model(peft_config(lora), model, adapter_name=ADAPTER)
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"{key}: peft cannot adapt {list(lora.target_modules)} ({' '.join(str(e).split())})"
            ) from e
    adapters = [p for n, p in model.named_parameters() if _LORA_PARAM.match(n)]
    if not adapters:
        raise ConfigError(f"{key}: no adapter was created in the {role}")
    for p in adapters:
        p.requires_grad_(True)
    return sum(p.numel() for p in adapters)


def partition_adapters(model: torch.nn.Module, ds_config: dict, topo) -> int:
    """ZeRO-3-partition the adapters injected into a partitioned base (the engine's dtype; rank 0's values)."""
    from .partitioned import partition_rest

    return partition_rest(model, ds_config, topo)


def is_adapter_param(name: str) -> bool:
    return _LORA_PARAM.match(name) is not None


def adapter_count(model: torch.nn.Module) -> int:
    """Adapter parameters of `model` (full sizes also when ZeRO-3 partitioned)."""
    return sum(getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters() if is_adapter_param(n))


def _tuner_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module, layers: list | None = None):
    """Within the block `module` computes with its base weights only (peft's ``enable_adapters(False)``);
    afterwards its adapters are on again, each adapter parameter's ``requires_grad`` as it was."""
    layers = _tuner_layers(module) if layers is None else layers
    flags = [(p, p.requires_grad) for m in layers for n in m.adapter_layer_names for p in getattr(m, n).parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


class AdapterOff(torch.nn.Module):
    """The frozen base of a LoRA-adapted module: its forward with every adapter disabled, under no_grad, in eval mode.

    The teacher when the fake score is an adapter on the teacher's weights
    (``models.lora.fake_score.share_teacher_base``). `module` is held, not registered as a
    child: its parameters belong to the fake score's engine, which gathers (ZeRO-3),
    steps and saves them; this object has none of its own. ``.module`` is what
    `sampling.samplers.transformer_velocity_fn` reads the compute dtype from.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.__dict__["module"] = module  # not a submodule: no parameters, state dict or hooks of its own
        self._layers = _tuner_layers(module)
        if not self._layers:
            raise ValueError(f"{type(module).__name__} has no adapters to disable")

    def forward(self, *args, **kwargs):
        module, training = self.module, self.module.training
        with torch.no_grad(), adapters_disabled(module, self._layers):
            module.eval()
            try:
                return module(*args, **kwargs)
            finally:
                module.train(training)


# ----------------------------------------------------------------------------- state dicts, merge, export


def base_key(name: str) -> str:
    """The plain model's name of a LoRA-wrapped module's base parameter (``x.base_layer.weight`` -> ``x.weight``)."""
    return name.replace(".base_layer.", ".")


def adapter_pairs(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {"A": [r, in], "B": [out, r]}} from a state dict of adapter parameters (module names)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        m = _LORA_PARAM.match(name)
        if m:
            pairs.setdefault(m["layer"], {})[m["ab"]] = t
    broken = sorted(k for k, v in pairs.items() if set(v) != {"A", "B"})
    if broken:
        raise ValueError(f"adapters without both lora_A and lora_B: {broken[:5]}")
    return pairs


@torch.no_grad()
def merge_lora(
    base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter folded in: ``W + (B @ A) * scale``, in fp32.

    `base`: the plain model's tensors (diffusers names); `adapters`: ``<layer>.lora_{A,B}.default.weight``
    tensors (module names); `scale` = alpha / r. Returns a new dict (fp32 everywhere); `base` is not changed.
    """
    out = {k: v.float() for k, v in base.items()}
    for layer, ab in adapter_pairs(adapters).items():
        key = f"{layer}.weight"
        if key not in out:
            raise KeyError(f"adapter on {layer}: the base has no {key}")
        delta = (ab["B"].float() @ ab["A"].float()) * scale
        if delta.shape != out[key].shape:
            raise ValueError(f"adapter on {layer}: B A is {tuple(delta.shape)}, the weight {tuple(out[key].shape)}")
        out[key] = out[key] + delta
    return out


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers weights folder (single file or sharded)."""
    from .builders import read_safetensors_folder

    return read_safetensors_folder(folder)


def write_peft_adapter(folder: str | os.PathLike, adapters: dict[str, torch.Tensor], lora, dtype=torch.float32) -> Path:
    """The adapters alone, in peft's and diffusers' formats, in `folder`:

    * ``adapter_config.json`` + ``adapter_model.safetensors`` (keys
      ``base_model.model.<layer>.lora_{A,B}.weight``): ``PeftModel.from_pretrained(transformer, folder)``;
    * ``pytorch_lora_weights.safetensors`` (keys ``transformer.<layer>.lora_{A,B}.weight``, the
      LoRA config in its metadata, as diffusers' ``WanPipeline.save_lora_weights`` writes them):
      ``WanPipeline.load_lora_weights(folder)``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = peft_config(lora)
    config.save_pretrained(str(folder))
    pairs = adapter_pairs(adapters)
    tensors = {(layer, ab): t.detach().to(dtype).contiguous() for layer, v in pairs.items() for ab, t in v.items()}
    save_file(
        {f"base_model.model.{layer}.lora_{ab}.weight": t for (layer, ab), t in tensors.items()},
        str(folder / PEFT_WEIGHTS),
        metadata={"format": "pt"},
    )
    # Keys prefixed by the pipeline component, as diffusers' `_save_lora_weights` packs them for a pipeline.
    meta = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    save_file(
        {f"transformer.{layer}.lora_{ab}.weight": t for (layer, ab), t in tensors.items()},
        str(folder / DIFFUSERS_WEIGHTS),
        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)},
    )
    return folder
