"""Per-rank memory: live activation/temporary bytes tracked on (fake) tensors, and ZeRO model states.

Activations. `LiveBytes` is a TorchDispatchMode that sees every tensor an operator
returns, keys it by its untyped storage (views share one) and keeps a running total of
the bytes of storages still alive (a weakref finalizer subtracts a storage when autograd
or Python drops it). It works on FakeTensors, where no allocator exists, and on frozen
modules, where torch's MemTracker fails (it registers gradient hooks, DESIGN.md).
Storages that exist before the mode is entered (parameters, buffers, inputs made
beforehand) are never counted, not even when an operator returns a view of them
(`weight.t()` in every linear) or writes into them in place: the tracker reports what a
phase allocates on top of the model states. Parameter gradients are excluded by `drop_param_grads` (ZeRO-3
reduce-scatters each gradient into its partition as soon as it is complete; the partition
is a model state). Do not count FLOPs in the same pass: FlopCounterMode's module tracker
keeps references to tensors and inflates the peak (DESIGN.md).

Model states. `zero_model_states` asks DeepSpeed's own estimator for the GPU bytes of one
trainable engine at its ZeRO stage - `estimate_zero3_model_states_mem_needs`
(deepspeed.runtime.zero.stage3) for stage 3, `estimate_zero2_model_states_mem_needs`
(deepspeed.runtime.zero.stage_1_and_2) for stage 2 - and adds a per-component breakdown
(that arithmetic is ours, see the function). Not modelled at either stage: the gradient
reduce buckets (`reduce_bucket_size` elements, two with `overlap_comm`) and ZeRO-3's
prefetch buffers, which DeepSpeed's estimators leave out as well. Frozen networks are
replicas counted by their bytes (`frozen_model_states`), except a teacher run as a ZeRO-3
inference engine (`parallel.zero_stage.teacher` 3): its partition plus one gathered layer
(`partitioned_frozen_states`). A LoRA role (``models.lora.<role>``) is a ZeRO-3 engine whose
optimizer holds the adapters only, over a frozen base partition (`lora_model_states`); a
teacher on the fake score's shared base holds nothing of its own (`shared_teacher_states`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 2**30


_ALIASING: dict = {}


def returns_alias(func) -> bool:
    """Whether an operator's outputs may alias an input (view ops, in-place and out= ops), by its schema."""
    r = _ALIASING.get(func)
    if r is None:
        r = _ALIASING[func] = any(ret.alias_info is not None for ret in func._schema.returns)
    return r


class LiveBytes(TorchDispatchMode):
    """Live bytes of storages created while the mode is active; `peak` is their maximum.

    Use `reset_peak()` between phases; `live` and `peak` are in bytes.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}  # id(storage object) -> bytes, for storages we count

    def reset_peak(self) -> None:
        self.peak = self.live

    def _release(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def _track(self, t: torch.Tensor, may_alias: bool = False) -> None:
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensor subclasses without a storage
            return
        key = id(st)
        if key in self._seen:
            return
        if may_alias:
            # A view (or an in-place result) of a storage not seen yet: it existed before the
            # mode (a parameter viewed as weight.t() by linear, an input made beforehand).
            return
        nbytes = st.nbytes()
        self._seen[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._release, key)

    def hold(self, t: torch.Tensor, nbytes: int) -> None:
        """Count `nbytes` more as live for as long as `t`'s storage lives (the peak is not raised)."""
        self.live += nbytes
        weakref.finalize(t.untyped_storage(), self._unhold, nbytes)

    def _unhold(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        alias = returns_alias(func)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, alias)
        return out


def drop_param_grads(modules) -> list:
    """Free each trainable parameter's .grad as soon as autograd has accumulated it.

    Models ZeRO-3, which reduce-scatters a finished gradient into this rank's partition
    (counted in the model states) and frees the full-size buffer. Returns the hook handles.
    """
    handles = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                handles.append(p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None)))
    return handles


# --------------------------------------------------------------------------- model states


@dataclass
class ModelStates:
    """GPU bytes of one network on one rank."""

    name: str
    params: int
    trainable: bool
    gpu_bytes: int  # what the plan adds up
    breakdown: dict[str, int]  # component -> bytes (ours; see zero_model_states)
    source: str
    stage: int = 0  # ZeRO stage of an engine: trainable, or 3 for the teacher's inference engine (0: a frozen replica)
    host_bytes: int = 0  # CPU memory per node for an offloaded optimizer (DeepSpeed's estimator), else 0


def largest_layer_params(module: torch.nn.Module) -> int:
    """DeepSpeed's `model_to_params` definition: the most parameters held directly by one module."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)


def _where(offload_optimizer: bool, offload_param: bool) -> str:
    if offload_param:
        return "params+optimizer offloaded to CPU"
    return "optimizer offloaded to CPU" if offload_optimizer else "all on GPU"


def zero_model_states(
    name: str,
    module: torch.nn.Module,
    gpus_per_node: int,
    nodes: int,
    offload_optimizer: bool,
    offload_param: bool,
    stage: int = 3,
) -> ModelStates:
    """A trainable engine's model states per rank under ZeRO `stage` (2 or 3) over all nodes*gpus ranks.

    The partition group is every rank (the topology's zero_group: dp*sp ranks), so the
    divisor is the world size N; P is the engine's parameter count.

    Stage 3: DeepSpeed's estimator with zero_init=True (the GPU figure does not depend on
    it): 18 bytes * P / N without offload, 2 with the optimizer offloaded, 0 with
    parameters offloaded, plus 4 bytes per parameter of the largest layer (its gathered
    fp32-sized working buffer). The breakdown is our arithmetic, for the table: bf16
    parameter shard 2 B, bf16 gradient shard 2 B, fp32 master 4 B, Adam exp_avg +
    exp_avg_sq 8 B per parameter / N, and 2 B fp32 gradient remainder that DeepSpeed's 18 B
    includes (its fp32 grad buffer for the optimizer step is 4 B where we count the bf16
    shard's 2 B).

    Stage 2: DeepSpeed's `estimate_zero2_model_states_mem_needs`: the full bf16 parameters
    (2 B * P, on every rank) + 18 B * P / N, or 2 B * P with the optimizer offloaded. The
    breakdown follows the estimator's own comment (bf16 grads 2 + fp32 grads 4 + fp32 master
    4 + Adam 8 bytes per parameter / N).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total = sum(p.numel() for p in module.parameters())
    world = gpus_per_node * nodes
    on_gpu = not (offload_optimizer or offload_param)
    offload = offload_optimizer or offload_param
    if stage == 2:
        if offload_param:
            raise ValueError(f"{name}: ZeRO stage 2 cannot offload parameters (offload_param is stage 3 only)")
        cpu_bytes, gpu_bytes = estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload_optimizer
        )
        breakdown = {
            "bf16 params (full)": 2 * total,
            "bf16 grads": 2 * total // world if on_gpu else 0,
            "fp32 grads": 4 * total // world if on_gpu else 0,
            "fp32 master": 4 * total // world if on_gpu else 0,
            "adam moments": 8 * total // world if on_gpu else 0,
        }
        source = f"DeepSpeed estimate_zero2_model_states_mem_needs, ZeRO-2 over {world} ranks"
    elif stage == 3:
        largest = largest_layer_params(module)
        cpu_bytes, gpu_bytes, largest_mem = estimate_zero3_model_states_mem_needs(
            total,
            largest,
            num_gpus_per_node=gpus_per_node,
            num_nodes=nodes,
            cpu_offload=offload,
            cpu_offload_params=offload_param,
            zero_init=True,
        )
        breakdown = {**_zero3_breakdown(total, world, on_gpu, offload_param), "largest layer": largest_mem}
        source = f"DeepSpeed estimate_zero3_model_states_mem_needs, ZeRO-3 over {world} ranks"
    else:
        raise ValueError(f"{name}: ZeRO stage {stage} is not modelled (the planner models stages 2 and 3)")
    return ModelStates(
        name,
        total,
        True,
        int(gpu_bytes),
        breakdown,
        f"{source}, {_where(offload_optimizer, offload_param)}",
        stage,
        int(cpu_bytes) if offload else 0,
    )


def _zero3_breakdown(n: int, world: int, on_gpu: bool, offload_param: bool, prefix: str = "") -> dict[str, int]:
    """Per-rank bytes of `n` trainable parameters' ZeRO-3 states by kind (what DeepSpeed's estimator sums)."""
    return {
        f"{prefix}bf16 params": 0 if offload_param else 2 * n // world,
        f"{prefix}bf16 grads": 2 * n // world if on_gpu else 0,
        f"{prefix}fp32 master": 4 * n // world if on_gpu else 0,
        f"{prefix}adam moments": 8 * n // world if on_gpu else 0,
        f"{prefix}fp32 grad (step)": 2 * n // world if on_gpu else 0,
    }


def lora_model_states(
    name: str, module: torch.nn.Module, gpus_per_node: int, nodes: int, offload_optimizer: bool, offload_param: bool
) -> ModelStates:
    """A LoRA engine's model states per rank (ZeRO-3 over all nodes*gpus ranks): trainable adapters, frozen base.

    The adapters (the module's ``requires_grad`` parameters, A adapters' count) are a
    trainable ZeRO-3 engine's states: DeepSpeed's `estimate_zero3_model_states_mem_needs`
    for A parameters, i.e. 18 bytes * A / N (2 with the optimizer offloaded) plus the
    gathered working buffer of the module's largest layer (4 bytes per parameter; a base
    layer, gathered in the forward like any other). The frozen base adds only its partition,
    at its parameters' dtype: bytes / N (no gradient, master or optimizer state), on the GPU,
    or in host memory with ``offload_param`` (our arithmetic). With the fake score on the
    teacher's shared base this partition is the teacher's too (`shared_teacher_states`).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    world = gpus_per_node * nodes
    adapters = sum(p.numel() for p in module.parameters() if p.requires_grad)
    base = [p for p in module.parameters() if not p.requires_grad]
    base_bytes = sum(p.numel() * p.element_size() for p in base)
    on_gpu = not (offload_optimizer or offload_param)
    offload = offload_optimizer or offload_param
    cpu_bytes, gpu_bytes, largest_mem = estimate_zero3_model_states_mem_needs(
        adapters,
        largest_layer_params(module),
        num_gpus_per_node=gpus_per_node,
        num_nodes=nodes,
        cpu_offload=offload,
        cpu_offload_params=offload_param,
        zero_init=True,
    )
    shard = -(-base_bytes // world)
    breakdown = {
        "frozen base (partition)": 0 if offload_param else shard,
        **_zero3_breakdown(adapters, world, on_gpu, offload_param, prefix="adapter "),
        "largest layer": largest_mem,
    }
    dtypes = "/".join(sorted({str(p.dtype).replace("torch.", "") for p in base}))
    return ModelStates(
        name,
        sum(p.numel() for p in module.parameters()),
        True,
        int(gpu_bytes) + (0 if offload_param else shard),
        breakdown,
        f"LoRA: {adapters / 1e6:,.1f}M adapter parameters by DeepSpeed estimate_zero3_model_states_mem_needs over "
        f"{world} ranks ({_where(offload_optimizer, offload_param)}) + the frozen {dtypes} base's partition (our "
        "arithmetic)",
        3,
        (int(cpu_bytes) if offload else 0) + (shard * gpus_per_node if offload_param else 0),
    )


def shared_teacher_states(module: torch.nn.Module) -> ModelStates:
    """The teacher on the fake score's shared base: no bytes of its own (its weights are the fake score's base)."""
    params = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return ModelStates(
        "teacher", params, False, 0, {}, "the fake score's frozen base with its adapter off (no copy of its own)", 3
    )


def frozen_model_states(name: str, module: torch.nn.Module) -> ModelStates:
    """A frozen replica (teacher, VAE, RAFT): every rank holds all of it, at its parameters' dtype."""
    total = sum(p.numel() for p in module.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    nbytes += sum(b.numel() * b.element_size() for b in module.buffers())
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in module.parameters()})
    return ModelStates(name, total, False, nbytes, {"weights": nbytes}, f"frozen replica, {'/'.join(dtypes)}")


def partitioned_frozen_states(
    name: str, module: torch.nn.Module, gpus_per_node: int, nodes: int, offload_param: bool = False
) -> ModelStates:
    """A frozen network run as a ZeRO-3 inference engine (the teacher at `parallel.zero_stage.teacher` 3).

    Our arithmetic (DeepSpeed's estimators assume an optimizer): no gradients, no master
    weights, no optimizer states, so each rank holds its partition of the parameters at
    their dtype, bytes / N over the N = nodes * gpus_per_node ranks of the ZeRO group (dp*sp),
    plus, while a layer runs, that layer gathered whole (the largest module's own parameters
    at their dtype; the prefetch bucket is not modelled, as for the trainable engines). With
    ``offload_param`` the partition lives in host memory (counted per node) and only the
    gathered layer is on the GPU.
    """
    world = gpus_per_node * nodes
    total = sum(p.numel() for p in module.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    shard = -(-nbytes // world)
    per_param = nbytes / total if total else 0.0
    largest = int(largest_layer_params(module) * per_param)
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())  # replicated (RoPE tables)
    breakdown = {"params (partition)": 0 if offload_param else shard, "largest layer (gathered)": largest}
    if buffers:
        breakdown["buffers"] = buffers
    dtypes = "/".join(sorted({str(p.dtype).replace("torch.", "") for p in module.parameters()}))
    where = "params offloaded to CPU" if offload_param else "all on GPU"
    return ModelStates(
        name,
        total,
        False,
        sum(breakdown.values()),
        breakdown,
        f"ZeRO-3 inference engine over {world} ranks, {dtypes}, {where} (our arithmetic)",
        3,
        shard * gpus_per_node if offload_param else 0,
    )
