"""Process topology: data parallel x Ulysses sequence parallel, and DeepSpeed's ``mpu``.

World = dp x sp. A sequence-parallel (SP) group is ``sp`` *contiguous* global ranks: the
DeepSpeed launcher numbers ranks node by node, so with ``sp`` dividing the GPUs per node
the per-layer all-to-alls stay on NVLink and only ZeRO's collectives cross nodes::

    world 16, sp 4:   SP groups [0..3] [4..7] [8..11] [12..15]
                      DP groups [0,4,8,12] [1,5,9,13] [2,6,10,14] [3,7,11,15]

The peers of an SP group work on the same clips (same data, same noise, same
timesteps), each on 1/sp of the tokens; the DP groups see different clips.

One `Topology` per process builds every group once and is handed, as ``mpu``, to every
``deepspeed.initialize`` (DeepSpeed keeps the last mpu in a module global, so engines
with different mpus would silently share the last one). `Topology.from_world` returns
that single instance. DeepSpeed's own alternatives are avoided on purpose:
``parallel_state_sp.initialize_sequence_parallel`` may run only once per process and
makes DeepSpeed treat the data-parallel group as absent, and the mesh path
(``sequence_parallel_size`` + ``data_parallel_size`` in the JSON) reported inconsistent
group sizes.
"""

from __future__ import annotations

import copy
import logging
import os
from datetime import timedelta

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from .ranks import free_port

log = logging.getLogger(__name__)

_TOPOLOGY: Topology | None = None
# The process-group timeout `init_distributed` was given: torch's new_group does not inherit
# the world group's timeout (it falls back to the backend default, 30 min for gloo, 10 for
# NCCL), so every group the topology builds passes it explicitly.
_TIMEOUT: timedelta | None = None


# --------------------------------------------------------------------------- process group


def init_distributed(timeout: timedelta | None = None) -> None:
    """Initialise ``torch.distributed`` / ``deepspeed.comm`` once, for launcher and plain runs.

    The backend is the accelerator's (NCCL on CUDA, gloo on DeepSpeed's CPU accelerator),
    and the device is bound to ``LOCAL_RANK`` before the process group exists so NCCL
    communicators land on the right GPU. Without a launcher (no ``WORLD_SIZE`` in the
    environment, no MPI) this sets up a world of one on a free local port, so single-process runs
    and tests take the same code path as ``deepspeed --num_gpus N``. Idempotent.
    """
    global _TIMEOUT
    if not torch.distributed.is_initialized():
        _TIMEOUT = timeout
        # NCCL: a collective that fails or outlives the timeout aborts the communicator and
        # raises on every rank (the watchdog tears the process down) instead of blocking
        # forever on a dead peer. (gloo raises at the timeout by itself.)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if not any(k in os.environ for k in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
            # Not under a launcher (torchrun/deepspeed set WORLD_SIZE; MPI launches are
            # discovered by DeepSpeed): a world of one, on a port only this process uses.
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {} if timeout is None else {"timeout": timeout}
    # Also called when torch.distributed is already up: deepspeed.comm then wraps the
    # existing group, which DeepSpeed's own collectives (DistributedAttention) require.
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), **kwargs)
    _release_cpu_shm_name()


def _release_cpu_shm_name() -> None:
    """Unlink this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer.

    On the CPU accelerator every rank creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (~66 MB, ops/csrc/cpu/comm/shm.cpp) and never unlinks it, so each launch leaks RAM until
    reboot (CI runs dozens of launches). Once every rank has mapped every peer's buffer (all
    have returned from init, hence the barrier), the names are no longer needed: unlinking keeps
    the mappings alive and frees the memory when the last process exits, even after a SIGKILL.
    """
    if get_accelerator().device_name() != "cpu":
        return
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()  # every CPU rank, file or not: a collective must not depend on local state
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    own = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{torch.distributed.get_rank()}"
    try:
        os.unlink(own)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- layout


def sp_dp_layout(world_size: int, sp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(SP groups, DP groups) as lists of global ranks: SP groups are contiguous blocks."""
    if sp_size < 1 or world_size < 1:
        raise ValueError(f"world size ({world_size}) and sp_size ({sp_size}) must be >= 1")
    if world_size % sp_size:
        raise ValueError(f"parallel.sp_size={sp_size} does not divide the world size {world_size}")
    dp_size = world_size // sp_size
    sp_groups = [list(range(i * sp_size, (i + 1) * sp_size)) for i in range(dp_size)]
    dp_groups = [list(range(j, world_size, sp_size)) for j in range(sp_size)]
    return sp_groups, dp_groups


def _local_world_size() -> int | None:
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):  # torchrun, DeepSpeed launcher
        if os.environ.get(key):
            return int(os.environ[key])
    return None


# --------------------------------------------------------------------------- topology


class Topology:
    """Data-parallel x sequence-parallel process groups; also DeepSpeed's Megatron-style ``mpu``.

    Attributes (plain ints / ProcessGroups, fixed for the life of the process):
        world_size, rank, sp_size, sp_rank, dp_size, dp_rank
        sp_group:    the Ulysses group (contiguous ranks, all-to-all over heads)
        dp_group:    ranks holding the same token shard of different clips (size dp)
        zero_group:  every rank holding a replica of the parameters, i.e. all dp*sp ranks:
                     ZeRO-3 partitions parameters and reduces gradients over it
        mp_group:    this rank alone (no tensor/pipeline parallelism)

    Build it with `Topology.from_world`; do not call the constructor twice in a process.
    """

    def __init__(self, sp_size: int):
        global _TOPOLOGY
        if _TOPOLOGY is not None:
            raise RuntimeError("a Topology already exists in this process; use Topology.from_world(sp_size)")
        if not torch.distributed.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call mogan_ds.parallel.init_distributed() first")
        dist = torch.distributed
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        sp_groups, dp_groups = sp_dp_layout(self.world_size, sp_size)
        self.sp_size = sp_size
        self.dp_size = self.world_size // sp_size
        self.sp_rank = self.rank % sp_size
        self.dp_rank = self.rank // sp_size
        self.sp_ranks = sp_groups[self.dp_rank]
        self.dp_ranks = dp_groups[self.sp_rank]

        local = _local_world_size()
        if sp_size > 1 and local is not None and local % sp_size:
            log.warning(
                "parallel.sp_size=%d does not divide the %d ranks per node: some sequence-parallel groups "
                "span nodes and their per-layer all-to-alls leave NVLink",
                sp_size,
                local,
            )

        # new_group is collective over the whole world: every rank creates every group, in
        # the same order, and keeps the one it belongs to.
        kw = {"timeout": _TIMEOUT} if _TIMEOUT is not None else {}
        for ranks in sp_groups:
            g = dist.new_group(ranks, **kw)
            if self.rank in ranks:
                self.sp_group = g
        for ranks in dp_groups:
            g = dist.new_group(ranks, **kw)
            if self.rank in ranks:
                self.dp_group = g
        self.zero_group = dist.new_group(list(range(self.world_size)), **kw)
        for r in range(self.world_size):
            g = dist.new_group([r], **kw)
            if r == self.rank:
                self.mp_group = g
        _TOPOLOGY = self

    @classmethod
    def from_world(cls, sp_size: int = 1) -> Topology:
        """The process's topology for ``sp_size`` (built on first call, returned afterwards).

        Initialises the process group if needed (`init_distributed`), so it also works in a
        plain ``python`` process (world 1). Asking again with another ``sp_size`` is an error:
        the groups are built once and every engine must share them.
        """
        if _TOPOLOGY is not None:
            if _TOPOLOGY.sp_size != sp_size:
                raise RuntimeError(
                    f"process groups were already built with sp_size={_TOPOLOGY.sp_size}; asked for {sp_size}. "
                    "All engines of a process share one topology."
                )
            return _TOPOLOGY
        init_distributed()
        return cls(sp_size)

    # ----------------------------------------------------------------- conveniences
    @property
    def is_sp_leader(self) -> bool:
        """First rank of its SP group (e.g. the one that loads or logs a clip for the group)."""
        return self.sp_rank == 0

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: dp {self.dp_rank}/{self.dp_size}, sp {self.sp_rank}/{self.sp_size} "
            f"(sp ranks {self.sp_ranks})"
        )

    def __repr__(self) -> str:
        return f"Topology({self.describe()})"

    # ----------------------------------------------------------------- DeepSpeed mpu API
    # DeepSpeed reads these (runtime/engine.py, runtime/config.py, runtime/zero/*,
    # utils/groups.py, utils/bwc.py). Deliberately NOT defined: initialize_sequence_parallel
    # (its presence makes DeepSpeed treat the mpu as parallel_state_sp and drop the
    # data-parallel group) and the tensor/pipeline variants (bwc falls back to the
    # model-parallel ones below; both are size 1 here).

    def get_data_parallel_group(self):
        """ZeRO's partition/reduction group: all dp*sp ranks that replicate the parameters.

        DeepSpeed converts parameters with ``zero.Init(data_parallel_group=<this>)`` and
        reduce-scatters each parameter's gradient over the group it was partitioned over,
        so this must include the SP peers (their gradients are partial sums over tokens).
        """
        return self.zero_group

    def get_data_parallel_world_size(self) -> int:
        """Number of *distinct* clips per micro step (dp, not dp*sp).

        DeepSpeed uses it only for batch arithmetic (train_batch_size = micro * accumulation
        * this) and data samplers; SP peers share clips, so they do not count twice.
        """
        return self.dp_size

    def get_data_parallel_rank(self) -> int:
        """Index of this rank's clip stream (SP peers share it)."""
        return self.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(range(self.world_size))

    def get_sequence_parallel_group(self):
        return self.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.sp_rank

    def get_sequence_data_parallel_group(self):
        return self.zero_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.rank

    def get_model_parallel_group(self):
        # A real one-rank group: DeepSpeed all-reduces norms/overflow flags over it, and
        # None would mean the whole world there.
        return self.mp_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def get_topology() -> Topology | None:
    """The process's topology, or None before `Topology.from_world`."""
    return _TOPOLOGY


# --------------------------------------------------------------------------- ZeRO config


def zero_config_fixups(ds_config: dict, topo, trainable: bool = True) -> dict:
    """A copy of a DeepSpeed config made correct for this topology's sequence parallelism.

    Why. Every SP rank computes the loss on the full (gathered) output, and the gather at
    the end of a sequence-parallel model back-propagates with its true adjoint, a
    reduce-scatter over the SP group (`mogan_ds.parallel.ulysses`). Each SP rank therefore
    holds sp x its tokens' share of every parameter gradient, and parameters that run after
    the gather (the discriminator's heads) hold the full gradient: on every parameter the
    *mean* over the SP group is the true gradient, and so is the mean over all dp*sp
    ranks. ZeRO-3 with ``reduce_scatter: true`` computes exactly that mean (it pre-divides
    by the whole sequence-data-parallel group). DeepSpeed's other reduction paths divide
    by dp only, i.e. they sum over the SP group and would give sp x the gradient:

      * ZeRO-3 with ``reduce_scatter: false`` (its contiguous all-reduce path), and
      * ZeRO stages 0-2 (engine / stage_1_and_2 all-reduce).

    (The alternative of a slice-only gather backward + ``reduce_scatter: false`` + big
    buckets matches those paths for a lone DiT, but counts the discriminator's heads sp
    times and gives the generator wrong gradients when its output reaches the
    discriminator through the replicated VAE and RAFT; see the module docstring of
    `ulysses`.) So, with sp > 1:

      * ``zero_optimization.reduce_scatter`` is forced to true (a warning if it was false);
      * a trainable engine must be ZeRO stage 3, without quantized gradients (qgZ
        reduces over its own node-based groups) and without gradient pre-division;
      * the mesh keys ``sequence_parallel_size`` / ``data_parallel_size`` are rejected at
        any sp: the topology is passed as ``mpu`` instead.

    ``trainable=False`` (a frozen engine that never reduces gradients) skips the gradient
    checks. The input dict is not modified.
    """
    cfg = copy.deepcopy(ds_config)
    for key in ("sequence_parallel_size", "data_parallel_size"):
        if key in cfg:
            raise ValueError(
                f"DeepSpeed config key '{key}' selects DeepSpeed's device-mesh path, which builds its own, "
                "inconsistent groups: remove it and set parallel.sp_size in the recipe (the topology is the mpu)"
            )
    if topo.sp_size == 1 or not trainable:
        return cfg
    zero = cfg.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage != 3:
        raise ValueError(
            f"zero_optimization.stage={stage} with parallel.sp_size={topo.sp_size}: only ZeRO stage 3 with "
            "reduce_scatter averages gradients over the sequence-parallel group; stages 0-2 sum them (sp x too large)"
        )
    if zero.get("reduce_scatter", True) is False:
        log.warning(
            "zero_optimization.reduce_scatter=false overridden to true: with sequence parallelism its "
            "all-reduce path sums gradients over the SP group"
        )
    zero["reduce_scatter"] = True
    if zero.get("zero_quantized_gradients", False):
        raise ValueError("zero_optimization.zero_quantized_gradients is not supported with parallel.sp_size > 1")
    if float(cfg.get("gradient_predivide_factor", 1.0)) != 1.0 or cfg.get("prescale_gradients", False):
        raise ValueError("gradient_predivide_factor / prescale_gradients must be left at their defaults with sp > 1")
    return cfg
