"""Process-level helpers every distributed part shares: this rank, a barrier, a free port.

They work with and without `torch.distributed` initialised, so library code (checkpoints,
export, logging) can call them in a single-process test or script exactly as under the
launcher.
"""

from __future__ import annotations

import socket

import torch.distributed as dist


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist_ready() else 0


def world_size() -> int:
    return dist.get_world_size() if dist_ready() else 1


def barrier() -> None:
    """A barrier over the world; a no-op in a single process."""
    if dist_ready():
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (``[obj]`` in a single process). Collective."""
    if not dist_ready():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def free_port() -> int:
    """A TCP port free on this host right now (rendezvous of a local launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
