"""Ulysses sequence parallelism for unmodified diffusers Wan models, applied from outside.

Nothing in the model knows about it. `parallelize_wan` installs, on a stock
`WanTransformer3DModel`:

* on every block's self-attention (``attn1``) a `UlyssesWanAttnProcessor`: q/k/v of the
  local tokens (RoPE applied with the local cos/sin), then DeepSpeed's
  `DistributedAttention` (all-to-all: local tokens x all heads -> all tokens x heads/sp),
  the ordinary attention kernel through diffusers' ``dispatch_attention_fn`` (so
  ``set_attention_backend("flash")`` still applies), and the inverse all-to-all.
  Cross-attention (``attn2``) keeps its processor: local queries attend to the full,
  replicated text, which needs no communication;
* forward hooks at the split points the model declares in ``_cp_plan``: shard block 0's
  ``hidden_states`` input and the RoPE cos/sin outputs along the token dim, gather
  ``proj_out``'s output along the token dim.

`parallelize_module` applies any such plan to any module (the motion discriminator uses
it: shard its backbone like the DiT, gather the tokens at the input of each head).

Gradient convention (why the gather back-propagates with a reduce-scatter)
--------------------------------------------------------------------------
Everything outside the sharded region is replicated: every SP rank holds the same
gathered output and computes the same loss. Treat each SP rank like a data-parallel
replica whose gradients are *averaged*: then the gradient a rank must send into its token
shard is sp x its slice of the true gradient, i.e. the sum over SP ranks of their slices,
which is the all-gather's true adjoint, a reduce-scatter. Sharding (a slice of a
replicated tensor) back-propagates locally (zero outside the slice). With these two rules
the SP-mean of every gradient, parameter or input, is exact, also when

* parameters run *after* the gather (the discriminator's heads and final MLP: each rank
  has the full gradient, the mean is right where a sum would count them sp times), and
* two sequence-parallel models are chained through replicated computation (generator ->
  VAE -> RAFT -> discriminator): the generator's reduce-scatter adds up the per-rank
  partial gradients that came back through the replicated part. A gather whose backward
  only takes this rank's slice would drop the other ranks' parts there.

ZeRO-3 with ``reduce_scatter: true`` averages over all dp*sp ranks, which is exactly this
convention; `mogan_ds.parallel.topology.zero_config_fixups` pins it. Without DeepSpeed,
average gradients over ``topo.sp_group`` yourself.

ZeRO-3 interplay: the hooks only replace a module's tensor inputs/outputs; input hooks
are prepended so that DeepSpeed's own pre-forward hooks (parameter fetch, backward
bookkeeping) see the tensors the module really computes with, and no hook touches
parameters. Hooks re-run identically when activation checkpointing recomputes a block.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import deepspeed.comm as dist
import torch
from deepspeed.sequence.layer import DistributedAttention
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanTransformerBlock, _get_qkv_projections
from torch import nn

_MARK = "_mogan_sp_hooked"  # attribute set on every module we hooked (guards double sharding)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Shard:
    """Keep this rank's 1/sp chunk of a tensor along ``dim`` (the token dim).

    ``expected_dims``: only shard tensors of this rank, pass others through untouched
    (diffusers' meaning; used for inputs that exist in two layouts, e.g. Wan 2.2's
    per-token timesteps vs Wan 2.1's per-clip ones).
    """

    dim: int = 1
    expected_dims: int | None = None


@dataclass(frozen=True)
class Gather:
    """All-gather a token-sharded tensor along ``dim`` over the SP group (backward: reduce-scatter).

    ``expected_dims`` is checked and a mismatch is an error: an ungathered shard would
    flow on silently.
    """

    dim: int = 1
    expected_dims: int | None = None


Op = Shard | Gather


@dataclass(frozen=True)
class ModulePlan:
    """What to do at one module. ``inputs`` keys: forward-parameter names or positional
    indices; ``outputs`` keys: index into the output tuple (0 for a single tensor)."""

    inputs: Mapping[str | int, Op] = field(default_factory=dict)
    outputs: Mapping[int, Op] = field(default_factory=dict)


Plan = Mapping[str, Any]  # module path ("" = root, one "*" atom = every child) -> ModulePlan or diffusers form


def plan_from_cp_plan(cp_plan: Mapping[str, Any]) -> dict[str, ModulePlan]:
    """Translate a diffusers ``_cp_plan`` (ContextParallelInput/Output) into `ModulePlan`s."""
    out: dict[str, ModulePlan] = {}
    for path, spec in cp_plan.items():
        if isinstance(spec, ModulePlan):
            out[path] = spec
        elif isinstance(spec, ContextParallelOutput) or (
            isinstance(spec, (list, tuple)) and all(isinstance(s, ContextParallelOutput) for s in spec)
        ):
            specs = [spec] if isinstance(spec, ContextParallelOutput) else list(spec)
            out[path] = ModulePlan(
                outputs={i: Gather(s.gather_dim, s.expected_dims) for i, s in enumerate(specs) if s is not None}
            )
        elif isinstance(spec, Mapping):
            inputs, outputs = {}, {}
            for key, s in spec.items():
                if isinstance(s, ContextParallelInput):
                    if s.split_output:
                        if not isinstance(key, int):
                            raise ValueError(
                                f"plan entry {path!r}: split_output needs an integer output index, got {key!r}"
                            )
                        outputs[key] = Shard(s.split_dim, s.expected_dims)
                    else:
                        inputs[key] = Shard(s.split_dim, s.expected_dims)
                elif isinstance(s, (Shard, Gather)):
                    inputs[key] = s
                else:
                    raise ValueError(f"plan entry {path!r}[{key!r}]: unsupported spec {s!r}")
            out[path] = ModulePlan(inputs=inputs, outputs=outputs)
        else:
            raise ValueError(f"plan entry {path!r}: unsupported spec {spec!r}")
    return out


def wan_plan(model: nn.Module, prefix: str = "", gather_output: bool = True) -> dict[str, ModulePlan]:
    """The split points a Wan transformer declares (``type(model)._cp_plan``), as `ModulePlan`s.

    ``prefix``: the model's path inside a larger module (e.g. ``"backbone"``).
    ``gather_output=False`` drops the output gathers (``proj_out``), for a backbone whose
    tokens are consumed elsewhere (the discriminator gathers at its heads instead).
    """
    cp_plan = getattr(type(model), "_cp_plan", None)
    if not cp_plan:
        raise ValueError(f"{type(model).__name__} declares no _cp_plan")
    plan = plan_from_cp_plan(cp_plan)
    result = {}
    for path, mp in plan.items():
        if not gather_output:
            mp = ModulePlan(
                inputs=mp.inputs, outputs={k: v for k, v in mp.outputs.items() if not isinstance(v, Gather)}
            )
            if not mp.inputs and not mp.outputs:
                continue
        full = ".".join(p for p in (prefix, path) if p)
        result[full] = mp
    return result


def _resolve(module: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """Submodules matching a path; one ``*`` atom matches any single name."""
    if pattern == "":
        return [("", module)]
    if pattern.count("*") > 1:
        raise ValueError(f"plan path {pattern!r}: at most one '*' is supported")
    rx = re.compile("^" + r"\.".join("[^.]+" if a == "*" else re.escape(a) for a in pattern.split(".")) + "$")
    found = [(n, m) for n, m in module.named_modules() if rx.match(n)]
    if not found:
        raise ValueError(f"plan path {pattern!r} matches no submodule of {type(module).__name__}")
    return found


# --------------------------------------------------------------------------- collectives


def _check_divisible(x: torch.Tensor, dim: int, sp: int, where: str) -> None:
    n = x.shape[dim]
    if n % sp:
        raise ValueError(
            f"sequence parallelism: {where} has {n} tokens along dim {dim} (shape {tuple(x.shape)}), "
            f"not divisible by sp_size={sp}. Every rank of a sequence-parallel group needs an equal share: "
            f"pick a clip size whose latent token count (frames/pt * height/ph * width/pw) is a multiple "
            f"of {sp}, or change parallel.sp_size."
        )


def shard_tensor(x: torch.Tensor, dim: int, topo, where: str = "tensor") -> torch.Tensor:
    """This SP rank's chunk of a replicated tensor along ``dim`` (differentiable, local)."""
    _check_divisible(x, dim, topo.sp_size, where)
    return x.chunk(topo.sp_size, dim=dim)[topo.sp_rank].contiguous()


class _GatherFromSequenceParallel(torch.autograd.Function):
    """All-gather along ``dim`` over the SP group; backward = reduce-scatter (sum), its adjoint."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group, sp: int) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.sp = dim, group, sp
        # Collectives concatenate along dim 0: move the token dim there and back.
        xt = x.movedim(dim, 0).contiguous()
        out = torch.empty((sp * xt.shape[0], *xt.shape[1:]), dtype=xt.dtype, device=xt.device)
        dist.allgather_fn(out, xt, group=group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gt = grad.movedim(ctx.dim, 0).contiguous()
        out = torch.empty((gt.shape[0] // ctx.sp, *gt.shape[1:]), dtype=gt.dtype, device=gt.device)
        dist.reduce_scatter_fn(out, gt, group=ctx.group)
        return out.movedim(0, ctx.dim), None, None, None


def gather_tensor(x: torch.Tensor, dim: int, topo) -> torch.Tensor:
    """Concatenate the SP group's shards along ``dim`` (backward: reduce-scatter; see module doc)."""
    if topo.sp_size == 1:
        return x
    return _GatherFromSequenceParallel.apply(x, dim, topo.sp_group, topo.sp_size)


def _apply(op: Op, x, topo, where: str):
    if not isinstance(x, torch.Tensor):
        if x is None:
            return None
        raise TypeError(f"sequence parallelism: {where} is a {type(x).__name__}, expected a tensor")
    if isinstance(op, Shard):
        if op.expected_dims is not None and x.dim() != op.expected_dims:
            return x  # the other layout of an optional input: not token-shaped, stays replicated
        return shard_tensor(x, op.dim, topo, where)
    if op.expected_dims is not None and x.dim() != op.expected_dims:
        raise ValueError(
            f"sequence parallelism: {where} has {x.dim()} dims, the plan gathers a {op.expected_dims}-dim tensor"
        )
    return gather_tensor(x, op.dim, topo)


# --------------------------------------------------------------------------- hooks


def _forward_params(module: nn.Module) -> list[str]:
    params = list(inspect.signature(type(module).forward).parameters)
    return params[1:]  # drop self


class SequenceParallelHandle:
    """What `parallelize_module` / `parallelize_wan` installed; ``remove()`` undoes it."""

    def __init__(self):
        self._hooks: list[Any] = []
        self._modules: list[nn.Module] = []
        self._processors: list[tuple[nn.Module, Any]] = []

    def extend(self, other: SequenceParallelHandle) -> SequenceParallelHandle:
        self._hooks += other._hooks
        self._modules += other._modules
        self._processors += other._processors
        return self

    @property
    def num_hooks(self) -> int:
        return len(self._hooks)

    @property
    def num_processors(self) -> int:
        return len(self._processors)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for m in self._modules:
            if hasattr(m, _MARK):
                delattr(m, _MARK)
        for attn, old in self._processors:
            attn.set_processor(old)
        self._hooks, self._modules, self._processors = [], [], []


def _input_hook(name: str, plan: ModulePlan, topo, params: list[str]):
    def hook(module, args, kwargs):
        args = list(args)
        for key, op in plan.inputs.items():
            where = f"input {key!r} of {name or '<root>'}"
            if isinstance(key, str) and key in kwargs:
                kwargs[key] = _apply(op, kwargs[key], topo, where)
                continue
            if isinstance(key, str):
                if key not in params:
                    raise ValueError(f"sequence parallelism: {name or '<root>'}.forward has no parameter {key!r}")
                idx = params.index(key)
            else:
                idx = key
            if idx < len(args):
                args[idx] = _apply(op, args[idx], topo, where)
            elif isinstance(key, int):
                raise ValueError(
                    f"sequence parallelism: {name or '<root>'} was called with {len(args)} positional args, plan needs #{key}"
                )
            # a named parameter left at its default: nothing to shard
        return tuple(args), kwargs

    return hook


def _output_hook(name: str, plan: ModulePlan, topo):
    def hook(module, args, output):
        single = isinstance(output, torch.Tensor)
        if not single and not isinstance(output, (tuple, list)):
            raise TypeError(
                f"sequence parallelism: {name or '<root>'} returned a {type(output).__name__}; plans address tensors or tuples"
            )
        outs = [output] if single else list(output)
        for idx, op in plan.outputs.items():
            if idx >= len(outs):
                raise ValueError(f"sequence parallelism: {name} returned {len(outs)} outputs, plan needs #{idx}")
            outs[idx] = _apply(op, outs[idx], topo, f"output {idx} of {name or '<root>'}")
        return outs[0] if single else type(output)(outs)

    return hook


def parallelize_module(module: nn.Module, plan: Plan, topo) -> SequenceParallelHandle:
    """Install the shard/gather hooks of ``plan`` on ``module``'s submodules.

    ``plan`` maps submodule paths (``""`` = ``module`` itself, one ``*`` atom = every
    child, e.g. ``"heads.*"``) to `ModulePlan`s or diffusers ``_cp_plan`` values. Example,
    the motion discriminator::

        parallelize_module(D, {
            "backbone.blocks.0": ModulePlan(inputs={"hidden_states": Shard(1)}),
            "backbone.rope": ModulePlan(outputs={0: Shard(1), 1: Shard(1)}),
            "heads.*": ModulePlan(inputs={0: Gather(1)}),
        }, topo)

    With ``topo.sp_size == 1`` nothing is installed. A module hooked twice is an error (it
    would be sharded twice).
    """
    handle = SequenceParallelHandle()
    if topo.sp_size == 1:
        return handle
    normalized = plan_from_cp_plan(plan)
    targets = [(path, name, sub) for path, mp in normalized.items() for name, sub in _resolve(module, path)]
    for _, name, sub in targets:
        if getattr(sub, _MARK, False):
            raise RuntimeError(f"sequence parallelism: {name or '<root>'} already carries sequence-parallel hooks")
    try:
        for path, name, sub in targets:
            mp = normalized[path]
            if mp.inputs:
                handle._hooks.append(
                    sub.register_forward_pre_hook(
                        _input_hook(name, mp, topo, _forward_params(sub)), with_kwargs=True, prepend=True
                    )
                )
            if mp.outputs:
                handle._hooks.append(sub.register_forward_hook(_output_hook(name, mp, topo)))
            setattr(sub, _MARK, True)
            handle._modules.append(sub)
    except Exception:
        handle.remove()
        raise
    return handle


# --------------------------------------------------------------------------- attention


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Identical to the closure in diffusers' WanAttnProcessor (interleaved pairs).
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class UlyssesWanAttnProcessor:
    """Wan self-attention over a token-sharded sequence via DeepSpeed's `DistributedAttention`.

    Same math as diffusers' ``WanAttnProcessor`` for self-attention. Layout is batch-first
    [B, S, H, D]: the all-to-all scatters heads (dim 2) and gathers tokens (dim 1).
    ``_attention_backend`` is read on every call, so ``set_attention_backend`` keeps
    working after parallelisation. ``_parallel_config`` stays None on purpose: it would
    switch on diffusers' own context parallelism inside the kernel call, on top of ours.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, sp_group, attention_backend=None):
        self._attention_backend = attention_backend
        self.dist_attn = DistributedAttention(self._local_attention, sp_group, scatter_idx=2, gather_idx=1)

    def _local_attention(self, query, key, value):
        return dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=None,
        )

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            raise ValueError(
                "UlyssesWanAttnProcessor is for self-attention (attn1); cross-attention needs no all-to-all"
            )
        if attention_mask is not None:
            raise ValueError("UlyssesWanAttnProcessor: a mask over the full sequence cannot be applied to token shards")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            # cos/sin were sharded like the tokens (rope output hook), so local RoPE is exact.
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)
        hidden_states = self.dist_attn(query, key, value, 0)  # batch_dim_idx=0
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def install_ulysses_attention(model: nn.Module, topo) -> SequenceParallelHandle:
    """Replace the self-attention processor of every Wan block under ``model`` (``*.attn1``).

    Only processors; no token sharding (see `parallelize_module` / `parallelize_wan`).
    Checks that sp divides every block's head count.
    """
    handle = SequenceParallelHandle()
    if topo.sp_size == 1:
        return handle
    blocks = [m for m in model.modules() if isinstance(m, WanTransformerBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} contains no WanTransformerBlock")
    for block in blocks:
        heads = block.attn1.heads
        if heads % topo.sp_size:
            raise ValueError(
                f"parallel.sp_size={topo.sp_size} does not divide the {heads} attention heads of the Wan DiT "
                "(Ulysses splits heads across the sequence-parallel group)"
            )
        if isinstance(block.attn1.processor, UlyssesWanAttnProcessor):
            raise RuntimeError("sequence parallelism: Ulysses attention is already installed on this model")
    for block in blocks:
        old = block.attn1.processor
        block.attn1.set_processor(UlyssesWanAttnProcessor(topo.sp_group, getattr(old, "_attention_backend", None)))
        handle._processors.append((block.attn1, old))
    return handle


def parallelize_wan(model: nn.Module, topo) -> SequenceParallelHandle:
    """Ulysses sequence parallelism on an unmodified diffusers `WanTransformer3DModel`.

    Ulysses self-attention in every block, plus the model's ``_cp_plan`` hooks (shard
    block 0's hidden states and the RoPE cos/sin, gather ``proj_out``'s output). Inputs
    and the returned sample are full-size and identical on every SP rank; gradients follow
    the convention in the module docstring. No-op at sp=1. Call before or after
    ``deepspeed.initialize`` (on ``engine.module``); deep-copy the model before, not after.
    """
    handle = install_ulysses_attention(model, topo)
    try:
        handle.extend(parallelize_module(model, wan_plan(model), topo))
    except Exception:
        handle.remove()
        raise
    return handle
