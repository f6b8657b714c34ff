"""Build models already partitioned by ZeRO-3 and load safetensors into the partitions, tensor by tensor.

The unpartitioned way (`builders.load_transformer`) materialises the whole model on every
rank, and ZeRO-3 partitions it only at `deepspeed.initialize`: every rank's peak host memory
is the full fp32 model (plus a state dict while loading). Here no rank ever holds more than

  * its own partition of every parameter (1/world of the model, in the engine's dtype),
  * one module's own freshly created parameters between their construction and their
    partitioning (one block's largest Linear, not a block, not the model), and
  * its slice of the checkpoint tensor being copied (`safe_open(...).get_slice`: the rows
    that overlap this rank's flat range, so at most its partition + 2 rows of one tensor).

Construction is `deepspeed.zero.Init` (`PartitionedBuild`), configured from the role's final
DeepSpeed dict, over the same process group the engine partitions over (the topology's
ZeRO group, as `deepspeed.initialize(mpu=topo)` does), so the engine takes the parameters as
they are. Two deliberate differences from DeepSpeed's default construction keep a model
built this way equal to the unpartitioned one:

  * No tensor-constructor overrides: tensors are created where and in the dtype the model
    code says (CPU, fp32), so buffers keep their precision (Wan's RoPE tables are built from
    positions up to 1024 with ``torch.arange``; under DeepSpeed's bf16 override they would be
    computed in bf16, whereas the engine leaves an unpartitioned model's buffers in fp32) and
    fresh weights (the discriminator's heads) draw the same CPU random numbers as they do in
    an unpartitioned build. DeepSpeed's post-init still moves each parameter to the
    accelerator before partitioning it; buffers are moved by `move_buffers`.
  * Each module's own parameters are cast to the engine's dtype right before DeepSpeed
    partitions them, as the engine casts an unpartitioned model's parameters (all of them:
    `_keep_in_fp32_modules` only keeps *buffers* in fp32 under DeepSpeed). A checkpoint
    value copied into a bf16 partition rounds exactly as fp32 load + engine cast does.

Loading writes each rank's flat slice of every parameter straight into ``param.ds_tensor``
(no collective). A parameter whose partition is not a plain local tensor (NVMe-swapped,
hpZ secondary partition, quantised, or currently gathered) is loaded through
``GatheredParameters(modifier_rank=0)`` instead: the group's first rank reads
the whole tensor, DeepSpeed broadcasts and re-partitions it.

The frozen teacher (`load_partitioned_frozen_transformer`, for its ZeRO-3 inference engine)
is built the same way with one difference: in half precision it keeps diffusers'
``_keep_in_fp32_modules`` parameters fp32, as the replica it replaces does
(`keep_partitions_in_fp32`), instead of casting every parameter as a trainable engine does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import deepspeed
import torch
from deepspeed import comm as dist
from diffusers import WanTransformer3DModel
from safetensors import safe_open

from .builders import is_block_at_or_after, keep_fp32_rule, safetensors_index, transformer_config


def zero3(ds_config: dict) -> bool:
    """Whether a role's final DeepSpeed dict runs ZeRO stage 3 (the only stage that partitions parameters)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


class PartitionedBuild(deepspeed.zero.Init):
    """`deepspeed.zero.Init` that creates tensors as the model code says and casts parameters just before partitioning.

    Use::

        with PartitionedBuild(ds_config, topo):
            model = WanTransformer3DModel.from_config(config)
        move_buffers(model)
        load_into_partitions(model, folder)

    ``ds_config`` is the role's final DeepSpeed dict (`train.engines.ds_config_for`): it sets the
    parameters' dtype (bf16/fp16/fp32), the offload device and the persistence threshold,
    exactly as for the engine that will train the model.
    """

    def __init__(self, ds_config: dict, topo):
        if not zero3(ds_config):
            raise ValueError("zero.Init partitions parameters for ZeRO stage 3 only; this role's ds_config is not")
        super().__init__(
            config_dict_or_path=ds_config,
            mpu=topo,
            data_parallel_group=topo.get_data_parallel_group(),
            tensor_overrides=[],
        )

    def _post_init_method(self, module: torch.nn.Module) -> None:
        # DeepSpeed calls this once per module, after the module's own __init__ and before
        # it partitions that module's own (recurse=False) parameters.
        with torch.no_grad():
            for p in module.parameters(recurse=False):
                if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != self.dtype:
                    p.data = p.data.to(self.dtype)
        super()._post_init_method(module)


def partition_rest(module: torch.nn.Module, ds_config: dict, topo) -> int:
    """Partition the parameters of `module` built outside `PartitionedBuild` (cast to the engine's dtype first).

    For fresh modules whose ``__init__`` writes into a child's parameters after the child
    was built: under zero.Init the child is already partitioned by then and the write is
    lost (``nn.MultiheadAttention`` zeroes ``out_proj.bias`` that way). Such modules are
    built whole, then handed to DeepSpeed's ``zero.Init(module=...)`` (which skips the
    parameters that are partitions already). Returns how many parameters it partitioned.
    """
    dtype = PartitionedBuild(ds_config, topo).dtype  # not entered: only reads the config
    rest = [p for p in module.parameters() if not hasattr(p, "ds_id")]
    with torch.no_grad():
        for p in rest:
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    deepspeed.zero.Init(
        module=module,
        config_dict_or_path=ds_config,
        mpu=topo,
        data_parallel_group=topo.get_data_parallel_group(),
        tensor_overrides=[],
    )
    return len(rest)


def move_buffers(module: torch.nn.Module, device: torch.device | str | None = None) -> None:
    """Put the (replicated, never partitioned) buffers on the accelerator; parameters are already there.

    The engine moves an unpartitioned model with ``module.to(device)`` but leaves a model
    built under zero.Init where it is.
    """
    from deepspeed.accelerator import get_accelerator

    device = torch.device(device or get_accelerator().current_device_name())
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and buf.device != device:
                sub._buffers[name] = buf.to(device)


# ----------------------------------------------------------------------------- checkpoints


def read_flat_range(fh, key: str, start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of the row-major flattened tensor ``key`` of an open safetensors file.

    Reads only the rows (along dim 0) that overlap the range, not the whole tensor.
    """
    sl = fh.get_slice(key)
    shape = sl.get_shape()
    if len(shape) == 0:
        return fh.get_tensor(key).reshape(-1)[start:end]
    row = math.prod(shape[1:])
    if row == 0 or end <= start:
        return torch.empty(0)
    r0, r1 = start // row, -(-end // row)
    rows = sl[r0:r1].reshape(-1)
    return rows[start - r0 * row : end - r0 * row]


def _direct_writable(p: torch.nn.Parameter) -> bool:
    """A partition we can overwrite in place: a local tensor, not swapped, no secondary copy, not gathered."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    t = p.ds_tensor
    return (
        p.ds_status == ZeroParamStatus.NOT_AVAILABLE
        and t is not None
        and t.numel() == t.ds_numel
        and getattr(t, "final_location", None) is None
        and getattr(p, "ds_secondary_tensor", None) is None
        and not hasattr(t, "ds_quant_scale")
    )


@torch.no_grad()
def _write_own_slice(p: torch.nn.Parameter, fh, key: str) -> None:
    group = p.ds_process_group
    size = p.ds_tensor.ds_numel
    start = size * dist.get_rank(group=group)
    end = min(start + size, p.ds_numel)
    part = p.ds_tensor.view(-1)
    if start < end:
        part[: end - start].copy_(read_flat_range(fh, key, start, end))
        part[end - start :].zero_()  # alignment padding of the last rank
    else:
        part.zero_()  # a rank past the end of a small parameter holds only padding


@torch.no_grad()
def _write_gathered(p: torch.nn.Parameter, fh, key: str) -> None:
    # modifier_rank is a rank within the parameter's partition group (DeepSpeed maps it to the global one).
    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        if dist.get_rank(group=p.ds_process_group) == 0:
            p.data.copy_(fh.get_tensor(key).reshape(p.ds_shape))


def load_into_partitions(
    module: torch.nn.Module,
    folder: str | os.PathLike,
    allow_unused: Callable[[str], bool] = lambda key: False,
    fresh: Callable[[str], bool] = lambda name: False,
    force_gathered: bool = False,
) -> dict[str, int]:
    """Copy a safetensors folder into `module`, whose parameters are ZeRO-3 partitions, one tensor at a time.

    Names are `module.state_dict()` names = checkpoint keys. Every parameter and persistent
    buffer must be in the checkpoint with its shape unless ``fresh(name)`` (freshly
    initialised weights, kept as they are); every checkpoint key must belong to the module
    unless ``allow_unused(key)`` (e.g. the blocks a truncated copy does not build).
    Buffers are replicated: copied whole. ``force_gathered`` loads every parameter through
    ``GatheredParameters`` (to test that path). Returns counts of what was loaded how.
    """
    index = safetensors_index(folder)
    params = dict(module.named_parameters())
    buffers = {n: b for n, b in module.state_dict(keep_vars=True).items() if n not in params}
    wanted = {n for n in (*params, *buffers) if not fresh(n)}
    missing = sorted(wanted - index.keys())
    unexpected = sorted(k for k in index.keys() - wanted if not allow_unused(k))
    if missing or unexpected:
        raise ValueError(
            f"{folder}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    not_zero = sorted(n for n in wanted & params.keys() if not hasattr(params[n], "ds_id"))
    if not_zero:
        raise ValueError(f"parameters {not_zero[:5]} are not ZeRO-3 partitions: build the model under PartitionedBuild")
    counts = {"direct": 0, "gathered": 0, "buffers": 0}
    by_file: dict[Path, list[str]] = {}
    for name in sorted(wanted):
        by_file.setdefault(index[name], []).append(name)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as fh:
            for name in names:
                shape = tuple(fh.get_slice(name).get_shape())
                if name in buffers:
                    b = buffers[name]
                    if shape != tuple(b.shape):
                        raise ValueError(f"{f}: {name} has shape {shape}, the model's buffer {tuple(b.shape)}")
                    with torch.no_grad():
                        b.copy_(fh.get_tensor(name))
                    counts["buffers"] += 1
                    continue
                p = params[name]
                if shape != tuple(p.ds_shape):
                    raise ValueError(f"{f}: {name} has shape {shape}, the model's parameter {tuple(p.ds_shape)}")
                if not force_gathered and _direct_writable(p):
                    _write_own_slice(p, fh, name)
                    counts["direct"] += 1
                else:
                    _write_gathered(p, fh, name)
                    counts["gathered"] += 1
    return counts


def load_partitioned_transformer(path: str | os.PathLike, ds_config: dict, topo, num_layers: int | None = None):
    """`builders.load_transformer` with the parameters ZeRO-3 partitioned from the start (same values).

    Args:
        path: diffusers folder of a `WanTransformer3DModel` (single-file or sharded safetensors).
        ds_config: the final DeepSpeed dict of the role that will train it (ZeRO stage 3);
            its precision is the parameters' dtype.
        topo: the process topology (the engine's mpu).
        num_layers: build and load only the first N blocks.
    """
    config = transformer_config(path, num_layers)
    with PartitionedBuild(ds_config, topo):
        model = WanTransformer3DModel.from_config(config)
    move_buffers(model)
    load_into_partitions(
        model, path, allow_unused=lambda k: num_layers is not None and is_block_at_or_after(k, num_layers)
    )
    return model


def load_partitioned_frozen_transformer(path: str | os.PathLike, ds_config: dict, topo):
    """`freeze(load_transformer(path, frozen_dtype))` with the parameters ZeRO-3 partitioned from the start.

    For the frozen teacher's inference engine (`train.engines.teacher_ds_config`: its precision is
    ``models.frozen_dtype``). The same values, dtypes and buffers as the replica: in half
    precision the parameters of the model's ``_keep_in_fp32_modules`` (Wan: time embedder,
    modulation tables, the affine cross-attention norm) stay fp32, as diffusers'
    ``from_pretrained(torch_dtype=...)`` keeps them and unlike a trainable engine, which casts
    every parameter (`keep_partitions_in_fp32`). Eval mode, no grads.
    """
    config = transformer_config(path)
    build = PartitionedBuild(ds_config, topo)
    with build:
        model = WanTransformer3DModel.from_config(config)
    keep_partitions_in_fp32(model, build.dtype)
    move_buffers(model)
    load_into_partitions(model, path)
    return model.requires_grad_(False).eval()


@torch.no_grad()
def keep_partitions_in_fp32(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Re-type the partitions of the model's fp32-kept parameters to fp32, before any weight is loaded.

    zero.Init partitions each module's parameters as the module is built, before its
    parent (which names it) exists, so the name rule of ``_keep_in_fp32_modules`` can only
    be applied afterwards. The partitions still hold their random initial values, which
    `load_into_partitions` overwrites, so nothing is rounded. ZeRO-3 gathers parameters
    grouped by their partition's dtype, and the engine does not re-cast a zero.Init model.
    Returns how many parameters were re-typed (0 when `dtype` is fp32).
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if dtype == torch.float32:
        return 0
    keep = keep_fp32_rule(model)
    n = 0
    for name, p in model.named_parameters():
        if not keep(name) or p.ds_tensor.dtype == torch.float32:
            continue
        t = p.ds_tensor
        if p.ds_status != ZeroParamStatus.NOT_AVAILABLE or getattr(t, "final_location", None) is not None:
            raise ValueError(f"{name}: its partition is not a local tensor (gathered or swapped); cannot keep it fp32")
        pinned = t.is_pinned()
        t.data = t.data.to(torch.float32)
        if pinned:  # an offloaded partition keeps its pinned host memory (async copies to the device)
            t.data = t.data.pin_memory()
        p.data = torch.empty(0, dtype=torch.float32, device=p.device)
        n += 1
    return n


def dropped(module: torch.nn.Module, key: str) -> bool:
    """Whether checkpoint key `key` belongs to a top-level attribute `module` set to None (weights it never runs)."""
    top = key.split(".", 1)[0]
    return hasattr(module, top) and getattr(module, top) is None
