"""GPUs the planner knows, and the iteration-time estimate.

Peak dense BF16 tensor-core throughput and memory, SXM parts, from NVIDIA's datasheets:
H100 SXM5 80 GB: 989 TFLOP/s dense BF16 (1,979 "with sparsity"), NVIDIA H100 Tensor
Core GPU datasheet; H200 SXM 141 GB: 989 TFLOP/s dense BF16 (the same GH100 compute;
1,979 with sparsity), NVIDIA H200 Tensor Core GPU datasheet. Memory sizes are the
marketing GB (10^9 bytes); `usable_bytes` subtracts a reserve for the CUDA context, NCCL
buffers and allocator fragmentation, itself an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9
GIB = 2**30

# CUDA context + NCCL communicators + caching-allocator fragmentation: an estimate (a few
# GiB on an H100 with NCCL initialised); not measured here (no GPU).
RESERVED_BYTES = 4 * GIB

# Model-FLOP utilisation assumed for the time estimate: an assumption, not a measurement.
# Large bf16 DiT training on H100s commonly reports 35-50%; the VAE convolutions and RAFT
# run well below the DiT's utilisation, so 0.35 is used for the whole iteration.
DEFAULT_MFU = 0.35


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_dense_flops: float  # FLOP/s
    memory_bytes: int

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - RESERVED_BYTES


GPUS = {
    "h100": GPU("H100 SXM 80GB", 989e12, 80 * GB),
    "h200": GPU("H200 SXM 141GB", 989e12, 141 * GB),
}


def estimate_seconds(flops_per_rank: float, gpu: GPU, mfu: float = DEFAULT_MFU) -> float:
    """Compute time of one iteration on one rank at `mfu` of the dense BF16 peak (an estimate;
    communication is assumed hidden behind compute)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    return flops_per_rank / (gpu.bf16_dense_flops * mfu)
