"""One pass for FLOPs and memory: a dispatch mode that counts FLOPs by network and tracks live bytes.

`PlanTrace` is `LiveBytes` (memory.py) plus FLOP counting with torch's own formulas
(`torch.utils.flop_counter.flop_registry`, the table FlopCounterMode reads, with the CPU
SDPA formulas of flops.py registered in it), so one run of a phase gives both its FLOPs
and its activation peak. FlopCounterMode itself is not used: its module tracker registers
gradient hooks on every module's inputs and outputs, which keeps tensors alive and
inflates a memory peak measured alongside it (DESIGN.md); this attribution holds no
tensor.

Attribution. Each labelled network's root module ("generator", "vae_decode", ...) gets a
forward pre-hook and a forward hook that push and pop its label on a stack, so an
operator run during a forward (or during an activation-checkpoint recomputation, which
re-enters the modules) belongs to the innermost label. Backward operators run outside any
module: they are attributed through the autograd node being executed
(`torch._C._current_autograd_node()`), whose sequence number was drawn from the thread's
autograd counter when its forward operator ran. Every push and pop records (the counter's
value, the label now on top), so a node's sequence number finds the label that was on top
when the node was created. Operators under no label are "other" (the trainer's loss and
schedule arithmetic; in backward, a checkpoint recomputation's operators outside the
labelled modules, e.g. the VAE chunk step's latent de-normalisation, take the label of the
node whose saved tensors triggered it).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict

import torch
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from . import flops as _flops  # noqa: F401 - registers the CPU SDPA formulas in flop_registry
from .flops import Flops
from .memory import LiveBytes, returns_alias

_next_sequence_nr = torch._C._autograd._get_sequence_nr
_current_node = torch._C._current_autograd_node


class ModuleLabels:
    """Forward hooks on labelled root modules: a label stack plus (sequence number, label) change points."""

    def __init__(self, labels: dict[torch.nn.Module, str], claiming: tuple[str, ...] = ()):
        """`claiming`: labels that keep a labelled module run inside them (the teacher on the fake score's
        shared base runs the fake score's module: what it computes is the teacher's)."""
        self.claiming = frozenset(claiming)
        self.stack: list[str] = []
        self._seqs: list[int] = [0]
        self._tops: list[str | None] = [None]
        self._handles = []
        for module, label in labels.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(label)))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))

    def _mark(self) -> None:
        seq, top = _next_sequence_nr(), (self.stack[-1] if self.stack else None)
        if seq == self._seqs[-1]:
            self._tops[-1] = top
        else:
            self._seqs.append(seq)
            self._tops.append(top)

    def _pre(self, label: str):
        def hook(module, args):
            top = self.stack[-1] if self.stack else None
            self.stack.append(top if top in self.claiming else label)
            self._mark()

        return hook

    def _post(self, module, args, output):
        self.stack.pop()
        self._mark()

    def current(self) -> str | None:
        """The label of the operator being dispatched now (forward stack, else the backward node's)."""
        if self.stack:
            return self.stack[-1]
        node = _current_node()
        if node is None:
            return None
        return self._tops[bisect_right(self._seqs, node._sequence_nr()) - 1]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default


def _stub_scalar(t: torch.Tensor):
    return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)


class PlanTrace(LiveBytes):
    """Live bytes (see LiveBytes) and FLOPs by label of everything dispatched while active.

    `take_flops()` returns the FLOPs counted since the last call and restarts the count;
    `counting = False` pauses FLOP counting (memory is always tracked). With
    `stub_scalars` (fake tensors hold no values), `.item()` returns 1 (True / 1 / 1.0):
    logged losses become placeholders and the trainer's finite-loss check passes. It is
    done here rather than in a mode of its own because every operator pays each Python
    dispatch mode's overhead, and the planner dispatches a few hundred thousand.
    """

    def __init__(self, labels: ModuleLabels | None = None, stub_scalars: bool = False):
        super().__init__()
        self.labels = labels
        self.counting = True
        self.stub_scalars = stub_scalars
        self._flops: dict[str | None, int] = defaultdict(int)

    def take_flops(self) -> Flops:
        counts, self._flops = self._flops, defaultdict(int)
        by_network = {k: v for k, v in counts.items() if k is not None and v}
        other = counts.get(None, 0)
        if other:
            by_network["other"] = by_network.get("other", 0) + other
        return Flops(sum(counts.values()), by_network)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.stub_scalars and func is _LOCAL_SCALAR:
            return _stub_scalar(args[0])
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        alias = returns_alias(func)
        # aten outputs: a tensor or a flat tuple/list of them (tree_flatten for anything else)
        if isinstance(out, torch.Tensor):
            self._track(out, alias)
        else:
            for t in out if isinstance(out, (tuple, list)) else tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._track(t, alias)
                elif isinstance(t, (tuple, list)):
                    for u in tree_flatten(t)[0]:
                        if isinstance(u, torch.Tensor):
                            self._track(u, alias)
        if self.counting:
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                label = self.labels.current() if self.labels is not None else None
                self._flops[label] += formula(*args, **kwargs, out_val=out)
        return out
