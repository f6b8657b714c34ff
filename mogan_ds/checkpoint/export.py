"""Export the trained generator as a diffusers folder that `WanPipeline.from_pretrained` loads.

The export is the teacher's release folder with `transformer/` replaced by the generator
(optionally its EMA): the VAE, text encoder, tokenizer, scheduler and model_index.json
are hard-linked (copied where links are impossible), so a 1.3B export costs one
transformer's worth of disk. The scheduler is the release's; sample with
`launch/sample.py` (the distilled 3-step sampler) or WanPipeline with few steps.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from ..models.lora import is_adapter_param, merge_lora, read_weights, scaling, write_peft_adapter
from ..parallel.ranks import process_rank
from .master_weights import full_master

LORA_ADAPTER_DIR = "lora_adapter"  # a LoRA generator's export: its adapters alone, peft's and diffusers' formats


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def full_fp32_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (un-partitioned) fp32 CPU state dict of a DeepSpeed engine's module, from its fp32 masters.

    Parameters come from the optimizer's fp32 master weights (`master_weights.full_master`),
    not from the bf16 compute copy, which lags them by up to bf16's rounding at every
    weight (most lr-2e-6 updates never reach it). Collective: every rank calls it; one
    parameter is assembled at a time, so peak memory is one parameter, not the model.
    Only rank 0 keeps the tensors (the other ranks return {}).
    """
    keep = process_rank() == 0
    state = {}
    for name, p in module.named_parameters():
        full = full_master(p)
        if keep:
            state[name] = full.cpu()
    if keep:
        for name, b in module.named_buffers():
            state[name] = b.detach().cpu().clone()
    return state


def adapter_fp32_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapters of a DeepSpeed engine's module, full fp32 masters (module names). Collective; rank 0 keeps them."""
    keep = process_rank() == 0
    state = {}
    for name, p in module.named_parameters():
        if is_adapter_param(name):
            full = full_master(p)
            if keep:
                state[name] = full.cpu()
    return state


def export_generator(
    module: torch.nn.Module,
    teacher_root: str | Path,
    out: str | Path,
    ema=None,
    dtype: torch.dtype = torch.float32,
    lora=None,
    base: str | Path | None = None,
) -> Path | None:
    """Write `<out>/` = teacher release with `transformer/` := the generator. Collective; rank 0 writes.

    `module` is the generator engine's module (a WanTransformer3DModel, possibly with
    ZeRO-3 partitions and sequence-parallel hooks, neither of which reach the export).
    A LoRA generator (`lora`: its ``models.lora.generator`` section, `base`: the folder of its
    frozen base) is exported merged, `export_lora_merged`: the base folder's weights plus its
    adapters' (or their EMA's) ``(alpha / r) B A``, and the adapters alone go to ``<out>/lora_adapter/``.
    """
    if lora is not None:
        if ema is not None:
            with ema.swapped_in():
                adapters = adapter_fp32_state_dict(module)
        else:
            adapters = adapter_fp32_state_dict(module)
        if process_rank() != 0:
            return None
        return export_lora_merged(adapters, lora, base, teacher_root, out, dtype)
    if ema is not None:
        with ema.swapped_in():  # the masters hold the EMA inside the block
            state = full_fp32_state_dict(module)
    else:
        state = full_fp32_state_dict(module)
    if process_rank() != 0:
        return None
    return write_pipeline_folder(state, dict(module.config), teacher_root, out, dtype)


def export_lora_merged(
    adapters: dict[str, torch.Tensor],
    lora,
    base: str | Path,
    teacher_root: str | Path,
    out: str | Path,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """`<out>/` = the release with `transformer/` := base + (alpha / r) B A, and ``<out>/lora_adapter/`` (the
    adapters alone, `lora.write_peft_adapter`). Shared by the trainer's export and ``python -m mogan_ds export``.

    The base weights are read from their folder, not gathered from the engine: the base is
    frozen, so the folder holds exactly what training started from (at its own precision,
    also when the engine computed with a bf16 copy). Host memory: the base in fp32, twice.
    """
    from ..models.builders import read_transformer_config

    merged = merge_lora(read_weights(base), adapters, scaling(lora))
    out = write_pipeline_folder(merged, read_transformer_config(base), teacher_root, out, dtype)
    write_peft_adapter(out / LORA_ADAPTER_DIR, adapters, lora)
    return out


def write_pipeline_folder(
    state: dict[str, torch.Tensor],
    transformer_config: dict,
    teacher_root: str | Path,
    out: str | Path,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """`<out>/` = the teacher release with `transformer/` := a clean model holding `state`.

    Shared by the trainer's export and `python -m mogan_ds export` (from a checkpoint on
    disk), so both write the same folder from the same weights. Written to `<out>.partial`
    and renamed, so an interrupted export never leaves a half folder under `out`.
    """
    out, teacher_root = Path(out), Path(teacher_root)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(teacher_root, tmp, copy_function=_link_or_copy, ignore=shutil.ignore_patterns("transformer"))
    # Where the weights were loaded from (from_pretrained's `_name_or_path`, absent when built
    # partitioned from a config) is a path on the training machine, not part of the release.
    config = {k: v for k, v in transformer_config.items() if k != "_name_or_path"}
    clean = WanTransformer3DModel.from_config(config)
    clean.load_state_dict({k: v for k, v in state.items() if k in clean.state_dict()}, strict=True)
    clean.to(dtype).save_pretrained(tmp / "transformer")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
