"""Exponential moving average of the generator's fp32 master weights, per rank for its own shard.

The EMA follows the optimizer's fp32 master weights (`mogan_ds.master_weights`), not the
engine's bf16 compute copy: at the recipe's lr most updates round away in bf16, so an
EMA of the bf16 weights would stay where training started while the masters move.

Under ZeRO-3 a rank holds only its partition of every master, so the EMA is kept for
exactly that partition, in fp32: memory per rank is 4 bytes x params / dp, and no
collective is needed to update it (ZeRO-1/2: this rank's master fragment; an fp32 module
without ZeRO: the parameter itself). `swapped_in` exchanges the EMA with the masters for
the export, which reads the masters at fp32 (`export.full_fp32_state_dict`).
"""

from __future__ import annotations

import contextlib

import torch

from ..checkpoint.master_weights import local_master, set_local_master


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        # Built after deepspeed.initialize: the masters are the weights training starts from.
        self.shadow = [local_master(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * master (call after each applied optimizer step)."""
        for s, p in zip(self.shadow, self.params):
            s.lerp_(local_master(p).to(s.device, torch.float32), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the model {len(self.shadow)}")
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"]):
            if s.shape != v.shape:
                raise ValueError(
                    f"EMA shard shape {tuple(v.shape)} != {tuple(s.shape)}: resumed with another DP layout?"
                )
            s.copy_(v)

    @contextlib.contextmanager
    def swapped_in(self):
        """Within the block this rank's fp32 masters hold the EMA; afterwards the training values again.

        Only the masters change (the compute copy the forward uses does not): read the
        weights with `master_weights.full_master` / `export.full_fp32_state_dict`. Take no
        optimizer step inside the block.
        """
        backup = [local_master(p).detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            set_local_master(p, s)
        try:
            yield
        finally:
            for b, p in zip(backup, self.params):
                set_local_master(p, b)

    @contextlib.contextmanager
    def compute_swapped_in(self):
        """Within the block the *compute* weights the forward uses hold the EMA (cast to their
        dtype); afterwards the training values again. For sampling with the EMA (in-training
        evaluation). No optimizer step inside the block.

        ZeRO-3: this rank's compute partition `p.ds_tensor` has the shape of its master
        partition, so the EMA shard maps onto it one to one. A module without ZeRO: the
        parameter itself. ZeRO-1/2 keep a rank's master fragment in a flat buffer that does not
        line up with the full compute copy: refused (the product's engines are ZeRO-3).
        """
        targets = []
        for p in self.params:
            if hasattr(p, "ds_tensor"):
                targets.append(p.ds_tensor)
            elif hasattr(p, "_hp_mapping"):
                raise NotImplementedError(
                    "sampling with the EMA needs ZeRO-3 or no ZeRO (the EMA shard of a "
                    "ZeRO-1/2 rank covers only its optimizer fragment)"
                )
            else:
                targets.append(p.data)
        backup = [t.detach().clone() for t in targets]
        with torch.no_grad():
            for s, t in zip(self.shadow, targets):
                t.copy_(s.view(t.shape).to(t.device, t.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, t in zip(backup, targets):
                    t.copy_(b)
