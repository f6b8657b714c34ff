"""The plan as a table, a fit verdict with checked suggestions, and one JSON line.

`make_plan` runs the iteration (`runner.run_iteration`) and adds the model states
(`memory`), the communication (`comm`) and the time estimate (`hardware`). When the
configuration does not fit, each candidate fix (a larger sp_size, the optimizer offload
preset, a smaller GAN window) is itself planned with the same machinery and only those
that fit are suggested.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch

from ..config import Config, ConfigError, validate
from ..models.presets import transformer_limits
from ..train.roles import plan_roles
from .comm import EngineCalls, PlanTopology, offload_traffic, zero2_traffic, zero3_traffic
from .flops import Flops
from .hardware import DEFAULT_MFU, GIB, GPUS, comm_seconds, estimate_seconds, offload_seconds
from .memory import (
    ModelStates,
    frozen_model_states,
    lora_model_states,
    partitioned_frozen_states,
    shared_teacher_states,
    zero_model_states,
)
from .runner import RunResult, run_iteration

NETWORK_ORDER = ("generator", "teacher", "fake_score", "vae_decode", "raft", "vae_encode", "discriminator", "other")


def trainable_dtype(ds: dict | None) -> torch.dtype:
    if ds and ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds and ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32 if ds is not None else torch.bfloat16


def _offload(ds: dict, key: str) -> bool:
    return str(ds.get("zero_optimization", {}).get(key, {}).get("device", "none")) in ("cpu", "nvme")


@dataclass
class Plan:
    cfg: Config
    gpu_key: str
    nodes: int
    gpus_per_node: int
    mfu: float
    run: RunResult
    states: list[ModelStates]
    iteration_flops: Flops
    comm_bytes: dict[str, int]
    act_peak_bytes: int
    act_peak_phase: str
    offload_s: float = 0.0  # CPU optimizer step + host copies per iteration (0 without offload)
    host_link_bytes: int = 0  # per rank and iteration, offloaded engines only

    @property
    def gpu(self):
        return GPUS[self.gpu_key]

    @property
    def state_bytes(self) -> int:
        return sum(s.gpu_bytes for s in self.states)

    @property
    def host_bytes_per_node(self) -> int:
        return sum(s.host_bytes for s in self.states)

    @property
    def peak_bytes(self) -> int:
        return self.state_bytes + self.act_peak_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu.usable_bytes

    @property
    def compute_s(self) -> float:
        return estimate_seconds(self.iteration_flops.total, self.gpu, self.mfu)

    @property
    def comm_s(self) -> float:
        return comm_seconds(self.comm_bytes, self.gpu, self.nodes, self.gpus_per_node, self.cfg.parallel.sp_size)

    @property
    def seconds(self) -> float:
        """The estimate: compute at the MFU plus the offloaded optimizer's time; communication overlapped."""
        return self.compute_s + self.offload_s

    @property
    def seconds_serial(self) -> float:
        """An upper bound: the same with no communication overlapped (nominal link bandwidths)."""
        return self.seconds + self.comm_s

    def largest_consumer(self) -> tuple[str, int]:
        items = [(f"{s.name} {'model states' if s.trainable else 'weights'}", s.gpu_bytes) for s in self.states]
        items.append((f"activations ({self.act_peak_phase} phase)", self.act_peak_bytes))
        return max(items, key=lambda kv: kv[1])


# The traced iteration depends on the recipe, the world size and the trainable dtype, not on
# the ZeRO stages or offload: plans that differ only there (the offload suggestion, the
# ZeRO-2/ZeRO-3/offload comparisons of benchmarks/scale.py) reuse one trace.
_RUNS: dict[tuple, RunResult] = {}
_RUNS_KEPT = 4


def _traced(cfg: Config, world: int, dtype: torch.dtype) -> RunResult:
    key_cfg = copy.deepcopy(cfg)
    key_cfg.parallel.zero_stage = type(cfg.parallel.zero_stage)()
    key = (repr(key_cfg), world, dtype)
    run = _RUNS.get(key)
    if run is None:
        run = run_iteration(cfg, world, dtype)
        if len(_RUNS) >= _RUNS_KEPT:
            _RUNS.pop(next(iter(_RUNS)))
        _RUNS[key] = run
    return run


def _optimizer_steps(run: RunResult) -> dict[str, int]:
    """Optimizer steps per iteration and role, from the phases run (every phase due at step 0).

    A phase's micro steps accumulate into one update: each generator phase steps the
    generator once, the fake-score phase (gas x critic_updates micro steps) critic_updates
    times, the discriminator phases (with their extra-fake micro steps) D once.
    """
    steps = {"generator": 0, "fake_score": 0, "discriminator": 0}
    for ph in run.phases:
        if ph.name.startswith("generator"):
            steps["generator"] += 1
        elif ph.name == "fake_score":
            steps["fake_score"] += ph.repeats // run.gas
        elif ph.name.startswith("discriminator"):
            steps["discriminator"] = 1
    return steps


def model_states(
    roles: dict, modules: dict[str, torch.nn.Module], trainable, gpus_per_node: int, nodes: int
) -> list[ModelStates]:
    """Every network's model states per rank, from the role plans (`roles.plan_roles`) and the modules.

    The trainable engines at their ZeRO stage (a LoRA role: its adapters' states over its
    frozen base's partition); the teacher as its ZeRO-3 inference engine's partition, as a
    replica, or, on the fake score's shared base, with nothing of its own; the VAE and RAFT as
    replicas. Needs no traced iteration (the modules may be on the meta device).
    """
    states = []
    for r in trainable:
        plan, module = roles[r], modules[r]
        off_opt, off_param = plan.offloads("optimizer"), plan.offloads("param")
        if plan.lora is not None:
            states.append(lora_model_states(r, module, gpus_per_node, nodes, off_opt, off_param))
        else:
            states.append(zero_model_states(r, module, gpus_per_node, nodes, off_opt, off_param, plan.stage))
    teacher = roles.get("teacher")
    frozen = ["vae", "raft"]
    if teacher is not None and teacher.shared_base is not None:
        states.append(shared_teacher_states(modules[teacher.shared_base]))
    elif teacher is not None and teacher.partitioned:
        states.append(
            partitioned_frozen_states("teacher", modules["teacher"], gpus_per_node, nodes, teacher.offloads("param"))
        )
    else:
        frozen.insert(0, "teacher")
    return states + [frozen_model_states(n, modules[n]) for n in frozen if n in modules]


def make_plan(cfg: Config, ds: dict, nodes: int, gpus_per_node: int, gpu: str, mfu: float = DEFAULT_MFU) -> Plan:
    if gpu not in GPUS:
        raise ConfigError(f"--gpu: unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    world = nodes * gpus_per_node
    validate(cfg, **transformer_limits(cfg.models), world_size=world)
    topo = PlanTopology(world, cfg.parallel.sp_size)
    # Each role's build decision, as the trainer makes it (`roles.plan_roles`: JSON + parallel.zero_stage.<role>).
    try:
        roles = plan_roles(cfg, ds, topo)
    except ValueError as e:  # zero_config_fixups: stage < 3 with sp > 1, ...
        raise ConfigError(f"plan: {e}") from None
    for role, plan in roles.items():
        if plan.trainable and plan.stage not in (2, 3):
            raise ConfigError(
                f"plan: {role} would run ZeRO stage {plan.stage}; only stages 2 and 3 are modelled "
                "(set zero_optimization.stage in the DeepSpeed JSON or parallel.zero_stage.<role>)"
            )
    teacher_plan = roles.get("teacher")
    teacher_ds = teacher_plan.ds_config if teacher_plan is not None and teacher_plan.partitioned else None
    run = _traced(cfg, world, trainable_dtype(ds))
    flops, calls = Flops(), {r: EngineCalls() for r in (*run.trainable, "teacher")}
    comm: dict[str, int] = {}
    for ph in run.phases:
        flops = flops + ph.flops.scaled(ph.repeats)
        for kind, b in ph.collectives.items():
            comm[kind] = comm.get(kind, 0) + b * ph.repeats
        for r, c in ph.engine_calls.items():
            calls[r].forwards += c.forwards * ph.repeats
            calls[r].grad_forwards += c.grad_forwards * ph.repeats
            calls[r].updates += c.updates * ph.repeats
    steps = _optimizer_steps(run)
    states = model_states(roles, run.modules, run.trainable, gpus_per_node, nodes)
    step_params, host_link = 0.0, 0
    for r in run.trainable:
        plan, module = roles[r], run.modules[r]
        off_opt, off_param = plan.offloads("optimizer"), plan.offloads("param")
        params = sum(p.numel() for p in module.parameters())
        calls[r].steps = steps[r]
        if plan.lora is not None:
            # Adapters train (gradients, steps); the frozen base is gathered with them in every
            # forward (a shared teacher's forwards included: they run this module).
            trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
            pbytes = sum(p.numel() * p.element_size() for p in module.parameters()) / params
            traffic = zero3_traffic(params, calls[r], world, param_bytes=pbytes, grad_params=trained)
        else:
            trained = params
            traffic = (zero3_traffic if plan.stage == 3 else zero2_traffic)(params, calls[r], world)
        for kind, b in traffic.items():
            comm[f"{kind} ({r})"] = b
        if off_opt or off_param:
            step_params += trained / world * steps[r]
            host_link += offload_traffic(trained, calls[r], world)
    if teacher_ds is not None:
        # The teacher's ZeRO-3 inference engine: one all-gather per forward (no_grad: no backward
        # re-gather, no gradients to reduce).
        teacher, off_param = run.modules["teacher"], teacher_plan.offloads("param")
        pbytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
        params = sum(p.numel() for p in teacher.parameters())
        gathered = zero3_traffic(params, calls["teacher"], world, param_bytes=pbytes / params)["zero3_all_gather"]
        comm["zero3_all_gather (teacher)"] = gathered
        if off_param:
            host_link += int(pbytes / world * calls["teacher"].forwards)
    offload_s = offload_seconds(step_params, host_link, GPUS[gpu], gpus_per_node) if step_params else 0.0
    peak = max(run.phases, key=lambda p: p.act_peak_bytes)
    return Plan(
        cfg,
        gpu,
        nodes,
        gpus_per_node,
        mfu,
        run,
        states,
        flops,
        comm,
        peak.act_peak_bytes,
        peak.name,
        offload_s,
        host_link,
    )


def _gib(n: float) -> str:
    return f"{n / GIB:7.2f} GiB"


def _tf(n: float) -> str:
    return f"{n / 1e12:9.1f}"


def format_plan(p: Plan) -> str:
    cfg, run = p.cfg, p.run
    nets = [n for n in NETWORK_ORDER if any(n in ph.flops.by_network for ph in run.phases)]
    lines = [
        f"plan: {p.nodes} node(s) x {p.gpus_per_node} {p.gpu.name}, world {p.nodes * p.gpus_per_node}, "
        f"sp {cfg.parallel.sp_size}, dp {p.nodes * p.gpus_per_node // cfg.parallel.sp_size}, micro batch {cfg.train.micro_batch_size}, "
        f"gas {run.gas} (D {run.disc_gas}), video {cfg.video.num_frames}x{cfg.video.height}x{cfg.video.width}, "
        f"GAN window {cfg.gan.window if cfg.gan.enabled else '-'}",
        "one rank, fake tensors; one micro step of each phase run and multiplied by its repeats "
        f"(distilled entry {run.entry_index} of {len(cfg.schedule.denoising_timesteps)})",
        "",
        "TFLOP per rank      " + " ".join(f"{n[:11]:>11}" for n in nets) + f" {'total':>11} {'act peak':>11}",
    ]
    for ph in run.phases:
        f = ph.flops.scaled(ph.repeats)
        row = " ".join(f"{f.by_network.get(n, 0) / 1e12:11.1f}" for n in nets)
        lines.append(
            f"{ph.name[:15]:<15} x{ph.repeats:<3}{row} {f.total / 1e12:11.1f} {ph.act_peak_bytes / GIB:7.2f} GiB"
        )
    it = p.iteration_flops
    lines.append(
        f"{'iteration':<19}"
        + " ".join(f"{it.by_network.get(n, 0) / 1e12:11.1f}" for n in nets)
        + f" {it.total / 1e12:11.1f}"
    )
    lines += ["", "memory per rank"]
    for s in p.states:
        detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in s.breakdown.items() if v) if s.trainable else ""
        lines.append(
            f"  {s.name:<14} {s.params / 1e9:6.2f} B params {_gib(s.gpu_bytes)}  {s.source}"
            + (f" [{detail} GiB]" if detail else "")
        )
    lines.append(
        f"  {'activations':<14} {'':15}{_gib(p.act_peak_bytes)}  peak of the {p.act_peak_phase} phase (live-bytes tracker, fake tensors)"
    )
    lines.append(
        f"  {'total':<14} {'':15}{_gib(p.peak_bytes)}  of {p.gpu.usable_bytes / GIB:.1f} GiB usable "
        f"({p.gpu.memory_bytes / 1e9:.0f} GB minus a 4 GiB reserve, an estimate)"
    )
    if p.host_bytes_per_node:
        lines.append(
            f"  {'host (CPU)':<14} {'':15}{_gib(p.host_bytes_per_node)}  per node for the offloaded optimizers "
            "(DeepSpeed's estimators, incl. their 1.5x buffer factor)"
        )
    lines += ["", "communication per rank and iteration"]
    for k, v in sorted(p.comm_bytes.items()):
        lines.append(f"  {k:<38} {_gib(v)}")
    if p.host_link_bytes:
        lines.append(f"  {'offload host<->GPU (PCIe)':<38} {_gib(p.host_link_bytes)}")
    lines += [
        "",
        f"estimated iteration time: {p.seconds:.1f} s (an estimate: {it.total / 1e12:.0f} TFLOP at {p.mfu:.0%} MFU of "
        f"{p.gpu.bf16_dense_flops / 1e12:.0f} TFLOP/s dense bf16"
        + (f" + {p.offload_s:.1f} s CPU optimizer step and host copies" if p.offload_s else "")
        + "; communication assumed overlapped)",
        f"  with no communication overlapped: {p.seconds_serial:.1f} s ({p.comm_s:.1f} s of collectives at nominal "
        f"link bandwidth: {'NVLink' if p.nodes == 1 else 'one 400 Gb/s NIC per GPU'} for ZeRO, NVLink for SP)",
    ]
    return "\n".join(lines)


def verdict(p: Plan) -> str:
    name, nbytes = p.largest_consumer()
    if p.fits:
        return f"fits: {p.peak_bytes / GIB:.1f} GiB of {p.gpu.usable_bytes / GIB:.1f} GiB usable per rank (largest: {name}, {nbytes / GIB:.1f} GiB)"
    return f"does not fit: {p.peak_bytes / GIB:.1f} GiB > {p.gpu.usable_bytes / GIB:.1f} GiB usable per rank; largest consumer: {name} ({nbytes / GIB:.1f} GiB)"


def candidate_fixes(p: Plan, ds: dict, offload_ds: dict | None) -> list[tuple[str, Config, dict]]:
    """Settings that lower the per-rank peak, each as (description, cfg, ds) to be planned."""
    cfg, world = p.cfg, p.nodes * p.gpus_per_node
    heads = transformer_limits(cfg.models)["num_heads"]
    out = []
    sp = cfg.parallel.sp_size * 2
    if heads % sp == 0 and world % sp == 0 and sp <= p.gpus_per_node:
        c = copy.deepcopy(cfg)
        c.parallel.sp_size = sp
        out.append((f"parallel.sp_size={sp}", c, ds))
    if offload_ds is not None and not _offload(ds, "offload_optimizer"):
        out.append(("--ds_config ds_configs/zero3_bf16_offload.json (optimizer states on CPU)", cfg, offload_ds))
    if cfg.gan.enabled and cfg.gan.window > 2:
        c = copy.deepcopy(cfg)
        c.gan.window = cfg.gan.window // 2
        out.append((f"gan.window={c.gan.window}", c, ds))
    return out


def suggestions(p: Plan, ds: dict, offload_ds: dict | None) -> list[tuple[str, Plan]]:
    """Candidate fixes that, planned with the same machinery, fit."""
    good = []
    for desc, cfg, d in candidate_fixes(p, ds, offload_ds):
        try:
            q = make_plan(cfg, d, p.nodes, p.gpus_per_node, p.gpu_key, p.mfu)
        except ValueError:
            continue
        if q.fits:
            good.append((desc, q))
    return good


def summary(p: Plan, fixes: list[tuple[str, Plan]] | None = None) -> dict:
    it = p.iteration_flops
    return {
        "fits": p.fits,
        "peak_gib_per_rank": round(p.peak_bytes / GIB, 2),
        "model_state_gib_per_rank": round(p.state_bytes / GIB, 2),
        "activation_peak_gib": round(p.act_peak_bytes / GIB, 2),
        "activation_peak_phase": p.act_peak_phase,
        "largest_consumer": p.largest_consumer()[0],
        "iteration_tflop_per_rank": round(it.total / 1e12, 2),
        "tflop_by_network": {k: round(v / 1e12, 2) for k, v in it.by_network.items()},
        "phase_tflop": {ph.name: round(ph.flops.total * ph.repeats / 1e12, 2) for ph in p.run.phases},
        "phase_act_peak_gib": {ph.name: round(ph.act_peak_bytes / GIB, 2) for ph in p.run.phases},
        "comm_gib": {k: round(v / GIB, 3) for k, v in p.comm_bytes.items()},
        "est_iteration_s": round(p.seconds, 2),
        "est_iteration_s_comm_serial": round(p.seconds_serial, 2),
        "comm_s": round(p.comm_s, 2),
        "offload_s": round(p.offload_s, 2),
        "zero_stage": {s.name: s.stage for s in p.states if s.trainable or s.stage},
        "lora_trainable_params": {
            r: sum(q.numel() for q in p.run.modules[r].parameters() if q.requires_grad)
            for r in p.run.trainable
            if getattr(p.cfg.models.lora, r).enabled
        },
        "host_gib_per_node": round(p.host_bytes_per_node / GIB, 2),
        "mfu_assumed": p.mfu,
        "gpu": p.gpu_key,
        "nodes": p.nodes,
        "gpus_per_node": p.gpus_per_node,
        "sp_size": p.cfg.parallel.sp_size,
        "suggestions": [d for d, _ in fixes or []],
    }


def render(p: Plan, fixes: list[tuple[str, Plan]] | None = None) -> str:
    """The whole report; its last line is one JSON object."""
    out = [format_plan(p), "", verdict(p)]
    if not p.fits:
        if fixes:
            for desc, q in fixes:
                out.append(
                    f"  would fit with {desc}: {q.peak_bytes / GIB:.1f} GiB per rank, est. {q.seconds:.1f} s/iteration (checked by planning it)"
                )
        else:
            out.append(
                "  none of the checked fixes (sp_size x2, optimizer offload, half the GAN window) fits on its own"
            )
    out.append(json.dumps(summary(p, fixes)))
    return "\n".join(out)
