"""GPUs the planner knows, and the iteration-time estimate.

Peak dense BF16 tensor-core throughput and memory, SXM parts, from NVIDIA's datasheets:
H100 SXM5 80 GB: 989 TFLOP/s dense BF16 (1,979 "with sparsity"), NVIDIA H100 Tensor
Core GPU datasheet; H200 SXM 141 GB: 989 TFLOP/s dense BF16 (the same GH100 compute;
1,979 with sparsity), NVIDIA H200 Tensor Core GPU datasheet. Memory sizes are the
marketing GB (10^9 bytes); `usable_bytes` subtracts a reserve for the CUDA context, NCCL
buffers and allocator fragmentation, itself an estimate.

Links, for the communication and offload time (nominal figures; achieved bandwidth is
lower, so the times are optimistic): NVLink 4 on H100/H200 SXM, 900 GB/s total, i.e.
450 GB/s per direction (the same datasheets); between nodes one 400 Gb/s NDR InfiniBand
NIC per GPU, 50 GB/s per direction (the DGX H100/H200 layout: 8 ConnectX-7 per node); to
the host PCIe Gen5 x16, 64 GB/s per direction (datasheets: "PCIe Gen5 128 GB/s").
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9
GIB = 2**30

# CUDA context + NCCL communicators + caching-allocator fragmentation: an estimate (a few
# GiB on an H100 with NCCL initialised); not measured here (no GPU).
RESERVED_BYTES = 4 * GIB

# Model-FLOP utilisation for the time estimate, measured: the paper's iteration (wan2.1-t2v-1.3b,
# 49x480x832, batch 1, world size 1, ds_configs/zero3_bf16.json) ran at 199.3 TFLOP/s of its
# planned 8,278 TFLOP on one H200 (41.5 s per iteration), 20.2% of the 989 TFLOP/s datasheet peak,
# on 2026-12-04 (`python3 benchmarks/gpu_check.py`, benchmarks/results/2026-12-04_h200_1/c_paper.json).
# Per phase 0.24 (generator DMD), 0.27 (fake score), 0.28 (discriminator) and 0.11 (the generator's
# GAN phase: VAE decode and RAFT); the DiT alone, forward + backward at that shape, reached 0.45.
# It was 0.35, an assumption, before that run; tests/test_gpu_results.py holds it to the file.
DEFAULT_MFU = 0.20


# Per-GPU inter-node bandwidth (one 400 Gb/s NIC per GPU), bytes/s per direction.
INTERNODE_BYTES_PER_S = 50e9

# DeepSpeedCPUAdam throughput of one node's host CPUs, parameters updated per second. The
# ZeRO-Offload paper (Ren et al., USENIX ATC 2021) reports CPU-Adam at roughly 0.2-0.25 s
# per billion parameters on a 2-socket server (DeepSpeed's docs: 5-7x torch's CPU Adam);
# 4e9/s is that order, an assumption, not measured here.
CPU_ADAM_PARAMS_PER_S = 4e9


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_dense_flops: float  # FLOP/s
    memory_bytes: int
    nvlink_bytes_per_s: float = 450e9  # per direction
    host_bytes_per_s: float = 64e9  # PCIe Gen5 x16, per direction

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


def comm_seconds(comm_bytes: dict[str, int], gpu: GPU, nodes: int, gpus_per_node: int, sp_size: int) -> float:
    """Time of the iteration's collectives if none overlapped compute: each kind's bytes per rank
    over the bottleneck link of its group (an estimate at nominal bandwidth).

    ZeRO collectives span every rank: NVLink within one node, the per-GPU NIC across
    nodes (a ring crosses the node boundary). The SP collectives (Ulysses all-to-all, the
    shard gather/scatter) stay inside a node while sp_size <= gpus_per_node.
    """
    world_bw = gpu.nvlink_bytes_per_s if nodes == 1 else min(gpu.nvlink_bytes_per_s, INTERNODE_BYTES_PER_S)
    sp_bw = gpu.nvlink_bytes_per_s if sp_size <= gpus_per_node else world_bw
    total = 0.0
    for kind, nbytes in comm_bytes.items():
        total += nbytes / (world_bw if kind.startswith("zero") else sp_bw)
    return total


def offload_seconds(step_params_per_rank: float, host_link_bytes: float, gpu: GPU, gpus_per_node: int) -> float:
    """Time an offloaded optimizer adds per iteration (an estimate; DeepSpeed runs the CPU step
    between backward and the next forward, not overlapped with compute).

    `step_params_per_rank`: parameters this rank's CPU Adam updates per iteration (its
    partition x optimizer steps); the node's host CPUs serve all `gpus_per_node` ranks at
    `CPU_ADAM_PARAMS_PER_S`. `host_link_bytes`: this rank's gradient and parameter copies
    over PCIe.
    """
    return step_params_per_rank * gpus_per_node / CPU_ADAM_PARAMS_PER_S + host_link_bytes / gpu.host_bytes_per_s
