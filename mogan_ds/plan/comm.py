"""Communication per rank and iteration: Ulysses collectives as they run, ZeRO traffic by arithmetic.

Sequence parallelism is planned with the project's real hooks (`mogan_ds.parallel`:
`UlyssesWanAttnProcessor` + DeepSpeed's `DistributedAttention`, the `_cp_plan` shard and
gather hooks) installed with a stand-in SP group. `LocalCollectives` replaces the four
`deepspeed.comm` functions they call with local operations of the same output shape, so
one process runs rank 0's shard exactly as the trainer would (S/sp tokens per rank outside
attention, all S tokens and heads/sp inside it) and counts the bytes each call moves:

    all_to_all_single   output <- input (equal split: every rank sends (sp-1)/sp of it)
    allgather_fn        output <- sp copies of the shard (receives (sp-1)/sp of output)
    reduce_scatter_fn   output <- sum of the sp chunks (sends (sp-1)/sp of the input)

Data values are meaningless (fake tensors); shapes, dtypes and autograd structure are
the real ones. ZeRO's own collectives are not run (the engines are stand-ins): their
bytes follow from each engine's parameter count, how often its module runs and how often
it steps (`zero3_traffic`, `zero2_traffic`, `offload_traffic`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


class PlanSPGroup:
    """Stands for a sequence-parallel process group of `size` ranks in `LocalCollectives`."""

    def __init__(self, size: int):
        self.size = size

    def __repr__(self) -> str:
        return f"PlanSPGroup(size={self.size})"


class PlanTopology:
    """The attributes of `mogan_ds.parallel.Topology` the trainer's phases and the SP hooks read, for rank 0."""

    def __init__(self, world_size: int, sp_size: int):
        if world_size % sp_size:
            raise ValueError(f"parallel.sp_size={sp_size} does not divide the world size {world_size}")
        self.world_size, self.sp_size, self.dp_size = world_size, sp_size, world_size // sp_size
        self.rank = self.sp_rank = self.dp_rank = 0
        self.sp_group = PlanSPGroup(sp_size)


@dataclass
class CollectiveBytes:
    """Bytes this rank sends/receives per collective kind (counted while enabled)."""

    enabled: bool = True
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, nbytes: float) -> None:
        if self.enabled:
            self.bytes[kind] += int(nbytes)
            self.calls[kind] += 1


class LocalCollectives:
    """Context manager: deepspeed.comm's SP collectives become local ops on `PlanSPGroup`s.

    Other groups fall through to DeepSpeed's functions unchanged.
    """

    NAMES = ("get_world_size", "all_to_all_single", "allgather_fn", "reduce_scatter_fn", "send", "recv")

    def __init__(self, counter: CollectiveBytes):
        self.counter = counter
        self._saved = {}

    def __enter__(self):
        import deepspeed.comm as dist

        self._saved = {n: getattr(dist, n) for n in self.NAMES}
        saved, counter = self._saved, self.counter

        def get_world_size(group=None):
            return group.size if isinstance(group, PlanSPGroup) else saved["get_world_size"](group)

        def all_to_all_single(
            output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
        ):
            if not isinstance(group, PlanSPGroup):
                return saved["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group, async_op)
            output.copy_(input)
            counter.add("ulysses_all_to_all", input.numel() * input.element_size() * (group.size - 1) / group.size)
            return None

        def allgather_fn(output_tensor, input_tensor, group=None, async_op=False, debug=None):
            if not isinstance(group, PlanSPGroup):
                return saved["allgather_fn"](output_tensor, input_tensor, group=group, async_op=async_op)
            output_tensor.view(group.size, *input_tensor.shape).copy_(
                input_tensor.unsqueeze(0).expand(group.size, *input_tensor.shape)
            )
            counter.add(
                "sp_all_gather", output_tensor.numel() * output_tensor.element_size() * (group.size - 1) / group.size
            )
            return None

        def reduce_scatter_fn(output_tensor, tensor, op=None, group=None, async_op=False, prof=False, debug=None):
            if not isinstance(group, PlanSPGroup):
                return saved["reduce_scatter_fn"](output_tensor, tensor, group=group, async_op=async_op)
            output_tensor.copy_(tensor.view(group.size, *output_tensor.shape).sum(0))
            counter.add("sp_reduce_scatter", tensor.numel() * tensor.element_size() * (group.size - 1) / group.size)
            return None

        def send(tensor, dst, group=None, tag=0):
            if not isinstance(group, PlanSPGroup):
                return saved["send"](tensor, dst, group=group, tag=tag)
            counter.add("sp_send", tensor.numel() * tensor.element_size())
            return None

        def recv(tensor, src=None, group=None, tag=0):
            # The SP-split motion path's cache gradients from the next SP rank: the buffer's
            # (fake) contents stand for them; only its size matters here.
            if not isinstance(group, PlanSPGroup):
                return saved["recv"](tensor, src=src, group=group, tag=tag)
            counter.add("sp_recv", tensor.numel() * tensor.element_size())
            return None

        dist.send, dist.recv = send, recv
        dist.get_world_size = get_world_size
        dist.all_to_all_single = all_to_all_single
        dist.allgather_fn = allgather_fn
        dist.reduce_scatter_fn = reduce_scatter_fn
        return self

    def __exit__(self, *exc):
        import deepspeed.comm as dist

        for n, f in self._saved.items():
            setattr(dist, n, f)
        return False


# --------------------------------------------------------------------------- ZeRO-3


@dataclass
class EngineCalls:
    """How often an engine's module ran in one iteration (counted by the runner's hooks)."""

    forwards: int = 0  # every forward: one all-gather of the parameters
    grad_forwards: int = 0  # forwards recorded by autograd: their backward re-gathers the parameters
    updates: int = 0  # backward+step calls: one gradient reduce-scatter each
    steps: int = 0  # optimizer steps (one per phase run: its micro steps accumulate into one update)


def zero3_traffic(
    params: int, calls: EngineCalls, world: int, param_bytes: float = 2, grad_params: int | None = None
) -> dict[str, int]:
    """Bytes per rank of one engine's ZeRO-3 collectives (our arithmetic, ring algorithms).

    A ring all-gather of P parameters partitioned over N ranks receives (N-1)/N * P *
    param_bytes per rank; a reduce-scatter of the gradients sends as much. The parameters
    are gathered at each forward and again in backward (ZeRO-3 releases them after
    forward; an activation-checkpoint recomputation fetches them for the backward that
    follows); gradients (bf16, the communication dtype of a bf16 engine) are
    reduce-scattered once per backward. Persistent small parameters
    (stage3_param_persistence_threshold) and prefetch reuse are ignored. A frozen ZeRO-3
    engine (the teacher's inference engine) runs under no_grad and never steps: only its
    per-forward all-gather is non-zero, at its parameters' bytes (`param_bytes`). A LoRA
    engine gathers its frozen base with its adapters but reduce-scatters the adapters'
    gradients only (`grad_params`, default all `params`).
    """
    if world <= 1:
        return {"zero3_all_gather": 0, "zero3_reduce_scatter": 0}
    shard = params * param_bytes * (world - 1) / world
    grads = (params if grad_params is None else grad_params) * 2 * (world - 1) / world
    return {
        "zero3_all_gather": int(shard * (calls.forwards + calls.grad_forwards)),
        "zero3_reduce_scatter": int(grads * calls.updates),
    }


def zero2_traffic(params: int, calls: EngineCalls, world: int, param_bytes: int = 2) -> dict[str, int]:
    """Bytes per rank of one ZeRO-2 engine's collectives (our arithmetic, ring algorithms).

    Every rank holds the full bf16 parameters, so a forward gathers nothing. Each backward
    reduce-scatters the gradients into their owners' partitions (stage 2 reduces at every
    micro step, bucket by bucket), and each optimizer step all-gathers the updated bf16
    parameters from their owners: (N-1)/N * P * param_bytes per rank for either.
    """
    if world <= 1:
        return {"zero2_all_gather": 0, "zero2_reduce_scatter": 0}
    shard = params * param_bytes * (world - 1) / world
    return {"zero2_all_gather": int(shard * calls.steps), "zero2_reduce_scatter": int(shard * calls.updates)}


def offload_traffic(params: int, calls: EngineCalls, world: int, grad_bytes: int = 2, param_bytes: int = 2) -> int:
    """Bytes per rank over the host link (PCIe) of an engine whose optimizer is offloaded (our arithmetic).

    Each backward copies this rank's gradient partition (P/N) to the host, and each step
    copies the updated partition of the half-precision parameters back. The copies are
    counted at the half-precision size (the fp32 cast happens on one side or the other).
    """
    return int(params / world * (grad_bytes * calls.updates + param_bytes * calls.steps))
