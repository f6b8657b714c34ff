"""The fp32 master weights of a DeepSpeed engine's parameters, read through DeepSpeed's accessors.

A bf16 engine computes with bf16 weights, but its optimizer updates an fp32 master copy
and rounds it into the bf16 one after every step. At the recipe's lr (2e-6) most updates
are far below bf16's resolution (|w| * 2^-8), so the bf16 copy barely moves while the
master does: anything that should follow the *training* (the EMA, the export) must read
the master, not the compute copy.

Where the master lives, by engine:

* ZeRO-3: each rank's fp32 partition (`fp32_partitioned_groups_flat` of
  `DeepSpeedZeroOptimizer_Stage3`), read and written with DeepSpeed's public
  `safe_get_local_fp32_param` / `safe_set_local_fp32_param`, gathered with
  `safe_get_full_fp32_param`. With `offload_optimizer` the accessor returns a copy on the
  accelerator, so writes go through the setter, never through the returned tensor.
* ZeRO-1/2 (and DeepSpeed's `BF16_Optimizer`): the fp32 fragment of the parameter this
  rank owns, `param._hp_mapping.get_hp_fragment()` (the object DeepSpeed's own
  `safe_get_full_fp32_param` reads; empty on ranks that own none of the parameter).
* An fp32 parameter with neither (ZeRO-0 fp32 engine, or no engine): the parameter is its
  own master.

A half-precision engine at ZeRO-0 keeps its master inside `FP16_Optimizer` /
`FP16_UnfusedOptimizer` (DeepSpeed 0.19 picks these for bf16 at stage 0, too), with no
per-parameter accessor: it is refused with an error rather than read from the rounded
compute copy.
"""

from __future__ import annotations

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_local_fp32_param


def _zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _z3_master(p: torch.nn.Parameter) -> bool:
    # The ZeRO-3 optimizer links itself to every module parameter, but keeps fp32 partitions
    # only for the ones it trains (requires_grad at deepspeed.initialize and now).
    return _zero3(p) and hasattr(p, "_z3_optimizer") and p.requires_grad


def local_master(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's share of `p`'s fp32 master values (flat for ZeRO; `p` itself otherwise).

    The result may be a copy (ZeRO-3 with offload): change the master with `set_local_master`.
    """
    if _z3_master(p):
        return safe_get_local_fp32_param(p)
    if _zero3(p):
        raise ValueError("a ZeRO-3 parameter the optimizer does not train has no fp32 master")
    if hasattr(p, "_hp_mapping"):
        if p._hp_mapping is None:  # this rank's optimizer partition holds none of p
            return torch.empty(0, dtype=torch.float32, device=p.device)
        return p._hp_mapping.get_hp_fragment()
    _require_fp32(p)
    return p.data


def _require_fp32(p: torch.nn.Parameter) -> None:
    if p.dtype != torch.float32:
        raise ValueError(
            f"a {p.dtype} parameter without a reachable fp32 master (a half-precision engine at ZeRO stage 0 "
            "keeps it inside FP16_Optimizer): use ZeRO stage >= 1 (the product runs ZeRO-3) or an fp32 engine"
        )


@torch.no_grad()
def set_local_master(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Overwrite this rank's share of `p`'s master with `value` (shaped as `local_master(p)`).

    The compute copy is not touched: it is refreshed from the master at the next optimizer step.
    """
    if _z3_master(p):
        safe_set_local_fp32_param(p, value)
    else:
        local_master(p).copy_(value)


def full_master(p: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 master of `p`, shaped like the module's parameter. Collective under ZeRO.

    A ZeRO-3 parameter the optimizer does not train has no master: it is gathered from its
    compute copy and upcast (that copy is all there is).
    """
    if _z3_master(p) or hasattr(p, "_hp_mapping"):
        return safe_get_full_fp32_param(p).detach().float()
    if _zero3(p):
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().float().clone()
    _require_fp32(p)
    return p.detach().clone()
