"""Attention-kernel selection (``models.attention_backend``) through diffusers' backend registry.

Every Wan attention processor, including the sequence-parallel one, dispatches its local
attention through ``dispatch_attention_fn`` with the processor's ``_attention_backend``,
so one ``set_attention_backend`` call switches the kernel everywhere.
"""

from __future__ import annotations

import logging

import torch
from deepspeed.accelerator import get_accelerator
from diffusers import ModelMixin
from diffusers.utils import is_flash_attn_available
from torch import nn

from ..models.builders import weights_dtype

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flash", "native")
_HALF = (torch.float16, torch.bfloat16)


def resolve_attention_backend(
    backend: str, model: nn.Module | None = None, device: torch.device | str | None = None
) -> str:
    """The diffusers backend name for ``auto`` / ``flash`` / ``native``.

    ``auto`` = ``flash`` (flash-attn 2) when it is installed, the device is CUDA and
    the model computes in fp16/bf16 (flash-attn has no fp32 kernel); ``native`` (torch
    SDPA) otherwise. The device is DeepSpeed's accelerator unless given (a sampler may
    run on the CPU of a CUDA machine).
    """
    if backend not in BACKENDS:
        raise ValueError(f"models.attention_backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device is None:
        device = get_accelerator().device_name()
    on_cuda = torch.device(device).type == "cuda"
    half = model is None or weights_dtype(model) in _HALF
    return "flash" if (is_flash_attn_available() and on_cuda and half) else "native"


def configure_attention(model: nn.Module, backend: str = "auto", device: torch.device | str | None = None) -> str:
    """Set the attention kernel of every attention processor in ``model``; returns the name used.

    Call it once the model has its compute dtype (for a bf16 DeepSpeed engine: on
    ``engine.module`` after ``deepspeed.initialize``), so that ``auto`` sees bf16. Works
    before or after `mogan_ds.parallel.parallelize_wan`.
    """
    name = resolve_attention_backend(backend, model, device)
    # A diffusers model directly, or the diffusers models inside a plain module (the
    # motion discriminator wraps a Wan backbone).
    found = [m for m in model.modules() if isinstance(m, ModelMixin)]
    outer = [m for m in found if not any(o is not m and any(c is m for c in o.modules()) for o in found)]
    if not outer:
        raise ValueError(f"{type(model).__name__} contains no diffusers model to set an attention backend on")
    for m in outer:
        m.set_attention_backend(name)
    # debug: it runs once per network per rank; the trainer states the choice once on rank 0.
    log.debug("attention backend of %s: %s (asked: %s)", type(model).__name__, name, backend)
    return name
