"""Exponential moving average of the generator, kept on each rank's own ZeRO-3 shard.

Under ZeRO-3 a rank holds only its partition of every parameter (`param.ds_tensor`), so
the EMA is kept for exactly that partition, in fp32: memory per rank is 4 bytes x
params / dp, and no collective is needed to update it. Under ZeRO-0/1/2 the full
parameter is local and is averaged instead. Export swaps the EMA into the partitions,
gathers, and swaps back (`swapped_in`).
"""

from __future__ import annotations

import contextlib

import torch


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    """The tensor this rank owns for `p`: its ZeRO-3 partition, or the parameter itself."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(_local(p).float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the model {len(self.shadow)}")
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"]):
            if s.shape != v.shape:
                raise ValueError(f"EMA shard shape {tuple(v.shape)} != {tuple(s.shape)}: resumed with another DP layout?")
            s.copy_(v)

    @contextlib.contextmanager
    def swapped_in(self):
        """Within the block the module's (local partitions of the) weights are the EMA's."""
        backup = [_local(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                _local(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    _local(p).copy_(b)
