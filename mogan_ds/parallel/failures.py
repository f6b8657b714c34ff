"""A collective that failed because another rank died or hangs, told as one line instead of a
backend traceback (`launch/train.py` uses it around the training loop).

With `parallel.timeout_minutes` every process group has that timeout
(`topology.init_distributed`): a rank that waits on a hung peer raises after it (gloo by
itself; NCCL through TORCH_NCCL_ASYNC_ERROR_HANDLING), a rank whose peer died raises as
soon as the connection drops. Both reach here as torch's DistError (or, from older
paths, a RuntimeError with the backend's wording).
"""

from __future__ import annotations

import torch

# How gloo and NCCL word a peer that stopped answering or went away.
_PEER_SIGNS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe", "nccl")


def is_peer_failure(exc: BaseException) -> bool:
    if isinstance(exc, torch.distributed.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in _PEER_SIGNS)


def peer_failure_message(exc: BaseException, rank: int, timeout_minutes: float, latest_checkpoint) -> str:
    first = " ".join(str(exc).split())[:300]
    resume = f"newest complete checkpoint {latest_checkpoint}" if latest_checkpoint else "no complete checkpoint yet"
    return (
        f"rank {rank}: a collective failed: another rank died or stopped answering for "
        f"parallel.timeout_minutes={timeout_minutes:g}; {resume} (restart with --resume). Backend said: {first}"
    )
