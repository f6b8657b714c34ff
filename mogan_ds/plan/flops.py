"""FLOP counting with `torch.utils.flop_counter.FlopCounterMode`, split by network.

The planner itself counts in `trace.PlanTrace` (the same formulas, one pass with the
memory tracker, exact attribution); `count_flops` is the independent reference the
calibration tests hold it to.

FlopCounterMode has no formula for the CPU flash-attention kernel
(`aten._scaled_dot_product_flash_attention_for_cpu` and its backward), which is what
`F.scaled_dot_product_attention` runs on CPU and on fake CPU tensors: without
`register_cpu_sdpa_formulas` attention, the largest share of a Wan DiT at ~20k tokens,
counts as zero. The formulas are torch's own `sdpa_flop_count` /
`sdpa_backward_flop_count` (the ones it registers for the CUDA flash kernel), so
forward = 4 * B * heads * S_q * S_k * head_dim (QK^T and PV, 2 FLOPs per MAC) and
backward = 2.5x that (score recomputation + four matmuls).

Attribution: FlopCounterMode's module tracker names each module by its path from the
first module it sees; `count_flops` seeds those names with one label per network
(`labels`: module -> "generator", "vae_decode", ...), so every operator runs under
"<label>.<submodule path>" in forward, in backward and in activation-checkpoint
recomputation alike. FLOPs under no label are reported as "other". Known gap: in the
generator's GAN phase some backward operators of activation-checkpointed chunks run after
the module tracker has left the recomputed module (measured on the tiny recipe: the
VAE/RAFT chunks' `convolution_backward` and part of the discriminator's attention
backward), so "other" there belongs to the motion path (VAE, RAFT, D); totals are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten
CPU_SDPA = aten._scaled_dot_product_flash_attention_for_cpu
CPU_SDPA_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # query/key/value [B, heads, S, head_dim], as for the CUDA flash kernel.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    # _scaled_dot_product_flash_attention_for_cpu_backward(grad_out, query, key, value, out, logsumexp, ...)
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def register_cpu_sdpa_formulas() -> None:
    """Register the CPU flash-SDPA formulas with FlopCounterMode (idempotent)."""
    if CPU_SDPA not in flop_registry:
        register_flop_formula(CPU_SDPA)(_cpu_sdpa_flop)
    if CPU_SDPA_BACKWARD not in flop_registry:
        register_flop_formula(CPU_SDPA_BACKWARD)(_cpu_sdpa_backward_flop)


register_cpu_sdpa_formulas()


@dataclass
class Flops:
    """FLOPs of one piece of work: the total and its split by network label."""

    total: int = 0
    by_network: dict[str, int] = field(default_factory=dict)

    def scaled(self, k: int) -> Flops:
        return Flops(self.total * k, {n: v * k for n, v in self.by_network.items()})

    def __add__(self, other: Flops) -> Flops:
        keys = dict.fromkeys([*self.by_network, *other.by_network])
        return Flops(
            self.total + other.total, {n: self.by_network.get(n, 0) + other.by_network.get(n, 0) for n in keys}
        )


def count_flops(fn: Callable[[], object], labels: dict[torch.nn.Module, str]) -> tuple[object, Flops]:
    """Run `fn()` under FlopCounterMode; return its result and the FLOPs split by `labels`.

    `labels` maps each network's root module to its label. Several modules may share a
    label (the VAE's decoder and its post_quant_conv are both "vae_decode").
    """
    counter = FlopCounterMode(display=False, depth=None)
    # Seed the module tracker's names (its private map, read by _get_mod_name): each
    # labelled module becomes a root named by its label instead of its class name.
    known = counter.mod_tracker._known_modules
    for module, label in labels.items():
        known[module] = label
    with counter:
        result = fn()
    counts = counter.get_flop_counts()
    total = sum(counts.get("Global", {}).values())
    by_network: dict[str, int] = {}
    for label in dict.fromkeys(labels.values()):
        n = sum(counts.get(label, {}).values())
        if n:
            by_network[label] = n
    other = total - sum(by_network.values())
    if other:
        by_network["other"] = other
    return result, Flops(total, by_network)
