"""Parallelism from outside the model: process topology (dp x sp) and Ulysses sequence parallelism.

Typical use in an engine builder::

    topo = Topology.from_world(cfg.parallel.sp_size)       # once per process; the mpu
    parallelize_wan(transformer, topo)                     # no-op at sp=1
    engine, *_ = deepspeed.initialize(model=transformer, mpu=topo,
                                      config=zero_config_fixups(ds_config, topo), ...)
    configure_attention(engine.module, cfg.models.attention_backend)
"""

from .attention import configure_attention, resolve_attention_backend
from .topology import Topology, get_topology, init_distributed, sp_dp_layout, zero_config_fixups
from .ulysses import (
    Gather,
    ModulePlan,
    SequenceParallelHandle,
    Shard,
    UlyssesWanAttnProcessor,
    gather_tensor,
    install_ulysses_attention,
    parallelize_module,
    parallelize_wan,
    plan_from_cp_plan,
    shard_tensor,
    wan_plan,
)

__all__ = [
    "Gather",
    "ModulePlan",
    "SequenceParallelHandle",
    "Shard",
    "Topology",
    "UlyssesWanAttnProcessor",
    "configure_attention",
    "gather_tensor",
    "get_topology",
    "init_distributed",
    "install_ulysses_attention",
    "parallelize_module",
    "parallelize_wan",
    "plan_from_cp_plan",
    "resolve_attention_backend",
    "shard_tensor",
    "sp_dp_layout",
    "wan_plan",
    "zero_config_fixups",
]
