"""Run repeated identical blocks once: measured replay of a module's forward and backward.

A Wan DiT is 30 (1.3B) or 40 (14B) identical `WanTransformerBlock`s, run by the generator,
the fake score, the teacher and the discriminator's backbone at the same token count in
every phase, and RAFT is called once per chunk of frame pairs with the same shapes. On
fake tensors each operator costs the same Python dispatch overhead whatever its size, so
the planner's run time is mostly these repeats. `BlockMemo` measures a block once per
distinct call signature and replays that measurement for every identical call:

* signature: the module's class, its parameters' shapes, dtypes and requires_grad, its
  training flag, grad mode, and every argument's shape, stride, dtype and requires_grad
  (non-tensor arguments by value). A call with an argument of another kind is run as is.
* measurement (`_probe`): the block's own forward on detached copies of the arguments,
  under identity saved-tensor hooks (so an enclosing activation checkpoint does not drop
  what the block saves), then, when the outputs need gradients, its backward into the
  arguments and parameters. Recorded: FLOPs, the live-bytes peak above the start, the
  bytes the forward leaves saved for backward, the same for backward, and the SP
  collective bytes of each (`LocalCollectives`). The probe's own FLOPs, bytes and
  collectives are then removed from the counts.
* replay (`_Replay`, an autograd Function standing for the block): forward raises the
  tracked peak by the measured amount, adds the FLOPs and collectives, returns empty
  outputs of the measured shapes and saves the arguments plus one buffer of the saved
  bytes; backward does the same with the backward's figures and returns empty gradients.
  Inside an activation-checkpointed region the checkpoint drops and recomputes these
  saved tensors exactly as it does the block's own, so the recomputation is replayed too.
* early stop: a recomputation ends at the last tensor its first forward saved, so a real
  block last in its region never runs the operators after its own last save (a RAFT call's
  final flow update and upsampling). The probe records those "tail" FLOPs; a replayed
  recomputation counts them only when it goes on past the block.
* probes leave no trace: saved tensors are kept detached (no reference cycle through the
  autograd graph) and attributes a forward sets on the modules (RAFT's correlation pyramid)
  are put back, so nothing of a probe stays alive in the tracked memory.

Parameter gradients are not produced (the planner frees them on completion anyway,
`memory.drop_param_grads`; their transient bytes are in the backward peak). The
calibration tests compare a memoised plan with the same phases run for real.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_flatten, tree_unflatten

from .comm import CollectiveBytes
from .trace import PlanTrace

_PLAIN = (int, float, bool, str, type(None))
_TENSOR_ARG = object()  # where an entry's recorded arguments had a tensor (None is a constant argument)
_saved_hooks = torch._C._autograd._top_saved_tensors_default_hooks
_current_node = torch._C._current_autograd_node


def _recomputing() -> bool:
    """Inside an activation checkpoint's recomputation: saved-tensor hooks set, during backward."""
    return _saved_hooks(False) is not None and _current_node() is not None


def _meta(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.requires_grad, t.device.type)


def _storages(ts) -> dict[int, int]:
    out = {}
    for t in ts:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            out[st._cdata] = st.nbytes()
    return out


@dataclass
class _Measure:
    flops: int = 0
    peak: int = 0  # live-bytes peak above the start
    saved: int = 0  # bytes left alive for backward (forward) / 0 (backward)
    collectives: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)


@dataclass
class _Entry:
    fwd: _Measure
    bwd: dict[tuple, _Measure]  # which differentiable outputs get a gradient -> the backward's figures
    module: torch.nn.Module
    forward: object  # the block's own forward
    in_spec: object  # pytree spec of (args, kwargs)
    in_leaves: list  # the first call's argument leaves, tensors replaced by _TENSOR_ARG
    out_spec: object  # pytree spec of the outputs
    out_leaves: list  # per leaf: ("t", shape, stride, dtype, requires_grad) or ("c", constant)
    nosave_peak: int | None  # forward peak above the start with saved tensors dropped (None: no-grad key)
    tail: int = 0  # forward FLOPs after the last saved tensor (skipped by a checkpoint's early stop)


def _keep(t: torch.Tensor) -> torch.Tensor:
    """Pack hook that keeps a saved tensor (an enclosing checkpoint would drop it). Detached:
    packing a block's *output* itself would make a tensor <-> grad_fn reference cycle through
    C++ that the garbage collector cannot see, and the probe's tensors would never be freed."""
    return t.detach()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _plain_attributes(module: torch.nn.Module) -> list[tuple[torch.nn.Module, dict]]:
    """Each submodule's public instance attributes (what a forward may leave behind, e.g.
    RAFT's `corr_block.corr_pyramid`), to be put back after a probe."""
    return [(m, {k: v for k, v in vars(m).items() if not k.startswith("_")}) for m in module.modules()]


def _restore_attributes(saved) -> None:
    """Undo what a probe's forward set on the modules: it ran outside the caller's code that
    would clear it, and its tensors would stay alive (and counted) until the next real call."""
    for m, attrs in saved:
        for k, v in attrs.items():
            if vars(m).get(k) is not v:
                setattr(m, k, v)


class BlockMemo:
    """Install on every module of `types` in `modules` while tracing with `mode` (and `counter`)."""

    def __init__(self, mode: PlanTrace, counter: CollectiveBytes | None, modules, types: tuple[type, ...]):
        self.mode, self.counter = mode, counter
        self.entries: dict[tuple, _Entry | None] = {}
        self.hits = self.misses = 0
        self._patched: list[torch.nn.Module] = []
        seen = set()
        for root in modules:
            for m in root.modules():
                if isinstance(m, types) and id(m) not in seen:
                    seen.add(id(m))
                    m.forward = self._wrap(m, m.forward)
                    self._patched.append(m)

    def remove(self) -> None:
        for m in self._patched:
            del m.forward
        self._patched.clear()

    # ------------------------------------------------------------------ call
    def _wrap(self, module, forward):
        def memo_forward(*args, **kwargs):
            return self._call(module, forward, args, kwargs)

        return memo_forward

    def _key(self, module, leaves) -> tuple | None:
        parts = []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                parts.append(_meta(x))
            elif isinstance(x, _PLAIN):
                parts.append(("c", x))
            else:
                return None
        params = tuple((tuple(p.shape), p.dtype, p.requires_grad) for p in module.parameters())
        return (type(module), params, module.training, torch.is_grad_enabled(), tuple(parts))

    def _call(self, module, forward, args, kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        key = self._key(module, leaves)
        if key is None:
            return forward(*args, **kwargs)
        if key not in self.entries:
            self.misses += 1
            self.entries[key] = self._probe(module, forward, leaves, spec)
        else:
            self.hits += 1
        entry = self.entries[key]
        if entry is None:  # not replayable (an output aliases an input): run it
            return forward(*args, **kwargs)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        anchor = next((p for p in module.parameters() if p.requires_grad), None)
        with_anchor = torch.is_grad_enabled() and anchor is not None
        recording = torch.is_grad_enabled() and (with_anchor or any(t.requires_grad for t in tensors))
        flat = _Replay.apply(self, entry, with_anchor, recording, *tensors, *([anchor] if with_anchor else []))
        if entry.tail and _recomputing() and self.mode.counting:
            # The recomputation went on past this block, so it ran the block's tail (_Replay.forward).
            self.mode._flops[self.mode.labels.current() if self.mode.labels is not None else None] += entry.tail
        it = iter(flat)
        outs = [next(it) if leaf[0] == "t" else leaf[1] for leaf in entry.out_leaves]
        return tree_unflatten(outs, entry.out_spec)

    # ------------------------------------------------------------------ measure
    def _snapshot(self):
        c = self.counter
        return (
            self.mode.peak,
            dict(self.mode._flops),
            dict(c.bytes) if c is not None else {},
            dict(c.calls) if c is not None else {},
        )

    def _restore(self, snap) -> None:
        self.mode.peak = snap[0]
        self._restore_counts(snap)

    def _restore_counts(self, snap) -> None:
        self.mode._flops.clear()
        self.mode._flops.update(snap[1])
        if self.counter is not None:
            self.counter.bytes.clear()
            self.counter.bytes.update(snap[2])
            self.counter.calls.clear()
            self.counter.calls.update(snap[3])

    def _since(self, snap, base_live: int, saved: int = 0) -> _Measure:
        flops = sum(self.mode._flops.values()) - sum(snap[1].values())
        coll, calls = {}, {}
        if self.counter is not None:
            coll = {k: v - snap[2].get(k, 0) for k, v in self.counter.bytes.items() if v != snap[2].get(k, 0)}
            calls = {k: v - snap[3].get(k, 0) for k, v in self.counter.calls.items() if v != snap[3].get(k, 0)}
        return _Measure(flops, self.mode.peak - base_live, saved, coll, calls)

    def _probe(self, module, forward, leaves, spec) -> _Entry | None:
        mode = self.mode
        snap = self._snapshot()
        grad_before = {p: p.grad for p in module.parameters()}
        attrs_before = _plain_attributes(module)
        try:
            inputs = [x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in leaves]
            in_storages = _storages(inputs)
            args, kwargs = tree_unflatten(inputs, spec)
            base = mode.live
            nosave_peak = None
            if torch.is_grad_enabled():
                # The forward's peak when its saved tensors are dropped as they are made (inside
                # an activation checkpoint's first forward) is the no-grad forward's.
                mode.peak = base
                with torch.no_grad():
                    forward(*args, **kwargs)
                nosave_peak = mode.peak - base
                self._restore_counts(snap)
            mode.peak = base
            flops0 = sum(snap[1].values())
            last_save = [None]

            def pack(t):
                last_save[0] = sum(mode._flops.values()) - flops0
                return _keep(t)

            with saved_tensors_hooks(pack, _same):
                out = forward(*args, **kwargs)
            out_leaves, out_spec = tree_flatten(out)
            out_tensors = [t for t in out_leaves if isinstance(t, torch.Tensor)]
            out_storages = _storages(out_tensors)
            if set(out_storages) & set(in_storages):
                return None
            saved = mode.live - base - sum(out_storages.values())
            fwd = self._since(snap, base, max(saved, 0))
            meta = [
                ("t", tuple(t.shape), t.stride(), t.dtype, t.requires_grad) if isinstance(t, torch.Tensor) else ("c", t)
                for t in out_leaves
            ]
            diff = [t for t in out_tensors if t.requires_grad]
            entry = _Entry(
                fwd,
                {},
                module,
                forward,
                spec,
                [_TENSOR_ARG if isinstance(x, torch.Tensor) else x for x in leaves],
                out_spec,
                meta,
                nosave_peak,
                fwd.flops - last_save[0] if last_save[0] is not None else 0,
            )
            if diff:
                mask = (True,) * len(diff)
                entry.bwd[mask] = self._backward(module, inputs, diff, mask)
            del out, out_leaves, out_tensors, diff, args, kwargs, inputs
            return entry
        finally:
            for p, g in grad_before.items():
                p.grad = g
            _restore_attributes(attrs_before)
            self._restore(snap)

    def _backward(self, module, inputs, diff, mask) -> _Measure:
        """Backward of a probe's differentiable outputs `diff` (those `mask` selects) into its inputs and parameters."""
        mode = self.mode
        grads = [torch.empty_like(t) for t, m in zip(diff, mask) if m]
        outs = [t for t, m in zip(diff, mask) if m]
        targets = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        targets += [p for p in module.parameters() if p.requires_grad]
        snap = self._snapshot()
        base = mode.live
        mode.peak = base
        torch.autograd.backward(outs, grads, inputs=targets)
        return self._since(snap, base)

    def backward_for(self, entry: _Entry, tensors, needs, mask) -> _Measure:
        """The backward's figures when only the outputs in `mask` get a gradient (probed on first use)."""
        m = entry.bwd.get(mask)
        if m is not None:
            return m
        module = entry.module
        snap = self._snapshot()
        grad_before = {p: p.grad for p in module.parameters()}
        attrs_before = _plain_attributes(module)
        try:
            it = iter(t.detach().requires_grad_(n) for t, n in zip(tensors, needs))
            inputs = [next(it) if x is _TENSOR_ARG else x for x in entry.in_leaves]
            args, kwargs = tree_unflatten(inputs, entry.in_spec)
            with torch.enable_grad(), saved_tensors_hooks(_keep, _same):
                out = entry.forward(*args, **kwargs)
                diff = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
                m = entry.bwd[mask] = self._backward(module, inputs, diff, mask)
            del out, diff, args, kwargs, inputs
            return m
        finally:
            for p, g in grad_before.items():
                p.grad = g
            _restore_attributes(attrs_before)
            self._restore(snap)

    def _credit(self, m: _Measure, peak: int | None = None, tail: int = 0) -> None:
        """Add a measurement's peak, FLOPs (less `tail`) and collectives."""
        mode = self.mode
        mode.peak = max(mode.peak, mode.live + (m.peak if peak is None else peak))
        if mode.counting and m.flops:
            mode._flops[mode.labels.current() if mode.labels is not None else None] += m.flops - tail
        if self.counter is not None and self.counter.enabled:
            for k, v in m.collectives.items():
                self.counter.bytes[k] += v
            for k, v in m.calls.items():
                self.counter.calls[k] += v


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memo: BlockMemo, entry: _Entry, with_anchor: bool, recording: bool, *tensors):
        # Inside an activation checkpoint's first forward (saved-tensor hooks set, not in
        # backward) the block's saved tensors are dropped as they are made; in its
        # recomputation (in backward) they are kept for the backward that follows.
        dropping = _saved_hooks(False) is not None and _current_node() is None
        # A recomputation stops early, right after the last tensor its first forward saved: in
        # the real block that is before its tail operators (those after its last save), here
        # at this Function's own save, which raises out of `apply`. So the tail is left out
        # here and counted by `_call` only when `apply` returns (the recomputation goes on).
        memo._credit(entry.fwd, entry.nosave_peak if dropping else None, entry.tail if _recomputing() else 0)
        outs = [torch.empty_strided(m[1], m[2], dtype=m[3]) for m in entry.out_leaves if m[0] == "t"]
        inputs = tensors[:-1] if with_anchor else tensors
        ctx.memo, ctx.entry = memo, entry
        ctx.in_meta = [(tuple(t.shape), t.stride(), t.dtype) for t in inputs]
        ctx.set_materialize_grads(False)
        if recording:
            # The block's saved activations: a 1-byte token stands for them and its storage's
            # lifetime carries their bytes (an activation checkpoint drops it at once, as it
            # drops the block's own saved tensors, so the bytes never coexist there).
            token = torch.empty(1, dtype=torch.uint8)
            if entry.fwd.saved:
                memo.mode.hold(token, entry.fwd.saved)
            ctx.save_for_backward(*inputs, token)
        no_grad = [o for o, m in zip(outs, [m for m in entry.out_leaves if m[0] == "t"]) if not m[4]]
        if no_grad:
            ctx.mark_non_differentiable(*no_grad)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        memo, entry = ctx.memo, ctx.entry
        saved = ctx.saved_tensors  # unpacked as the block's own backward would (checkpoint: recomputed here)
        needs = ctx.needs_input_grad[4:]
        # Only the outputs that get a gradient are backpropagated (RAFT's last hidden state gets none).
        tensor_outs = [m for m in entry.out_leaves if m[0] == "t"]
        mask = tuple(g is not None for g, m in zip(grad_outputs, tensor_outs) if m[4])
        if any(mask):
            memo._credit(memo.backward_for(entry, saved[: len(ctx.in_meta)], needs, mask))
        grads = [
            torch.empty_strided(shape, stride, dtype=dtype) if need else None
            for (shape, stride, dtype), need in zip(ctx.in_meta, needs)
        ]
        # the anchor parameter (if any) gets no gradient: parameter gradients are not modelled
        return (None, None, None, None, *grads, *([None] * (len(needs) - len(grads))))


def memo_types() -> tuple[type, ...]:
    """The module classes replayed: the Wan DiT block and torchvision's RAFT (a whole flow call).

    RAFT is replayed whole rather than per update block: its correlation lookups between
    the update blocks are half of its operators, and each call (a chunk of frame pairs at
    a fixed iteration count) is identical to the next.

    The Wan VAE's chunks are not replayed, although they repeat too (tried: 28 -> 21 s per
    1.3B plan). In the backward of a decode window the real checkpointed chunks overlap:
    part of a later chunk's recomputed activations is still alive when the earlier chunk
    recomputes, which a block measured on its own cannot show. The replayed plan put the
    paper shape's peak 1.8 GiB low (49.5 vs 51.3 GiB per rank); the decoder runs as is.
    """
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    from torchvision.models.optical_flow.raft import RAFT

    return (WanTransformerBlock, RAFT)
