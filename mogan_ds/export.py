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
from .checkpoint import process_rank


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def gathered_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (un-partitioned) CPU state dict of a possibly ZeRO-3-partitioned module. Collective."""
    import deepspeed

    params = list(module.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    if not zero3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    state = {}
    # Gather one submodule's direct params at a time: peak memory is one layer, not the model.
    for name, sub in module.named_modules():
        own = list(sub.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            if process_rank() == 0:
                for pname, p in sub.named_parameters(recurse=False):
                    state[f"{name}.{pname}" if name else pname] = p.detach().cpu().clone()
    if process_rank() == 0:
        for bname, b in module.named_buffers():
            state[bname] = b.detach().cpu().clone()
    return state


def export_generator(module: torch.nn.Module, teacher_root: str | Path, out: str | Path, ema=None,
                     dtype: torch.dtype = torch.float32) -> Path | None:
    """Write `<out>/` = teacher release with `transformer/` := the generator. Collective; rank 0 writes.

    `module` is the generator engine's module (a WanTransformer3DModel, possibly with
    ZeRO-3 partitions and sequence-parallel hooks, neither of which reach the export).
    """
    from diffusers import WanTransformer3DModel

    if ema is not None:
        with ema.swapped_in():
            state = gathered_state_dict(module)
    else:
        state = gathered_state_dict(module)
    if process_rank() != 0:
        return None
    out, teacher_root = Path(out), Path(teacher_root)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(teacher_root, tmp, copy_function=_link_or_copy, ignore=shutil.ignore_patterns("transformer"))
    clean = WanTransformer3DModel.from_config(dict(module.config))
    clean.load_state_dict({k: v for k, v in state.items() if k in clean.state_dict()}, strict=True)
    clean.to(dtype).save_pretrained(tmp / "transformer")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
