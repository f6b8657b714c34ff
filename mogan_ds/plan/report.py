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
from .comm import EngineCalls, zero3_traffic
from .flops import Flops
from .hardware import DEFAULT_MFU, GIB, GPUS, estimate_seconds
from .memory import ModelStates, frozen_model_states, zero_model_states
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

    @property
    def gpu(self):
        return GPUS[self.gpu_key]

    @property
    def state_bytes(self) -> int:
        return sum(s.gpu_bytes for s in self.states)

    @property
    def peak_bytes(self) -> int:
        return self.state_bytes + self.act_peak_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu.usable_bytes

    @property
    def seconds(self) -> float:
        return estimate_seconds(self.iteration_flops.total, self.gpu, self.mfu)

    def largest_consumer(self) -> tuple[str, int]:
        items = [(f"{s.name} {'model states' if s.trainable else 'weights'}", s.gpu_bytes) for s in self.states]
        items.append((f"activations ({self.act_peak_phase} phase)", self.act_peak_bytes))
        return max(items, key=lambda kv: kv[1])


def make_plan(cfg: Config, ds: dict, nodes: int, gpus_per_node: int, gpu: str, mfu: float = DEFAULT_MFU) -> Plan:
    if gpu not in GPUS:
        raise ConfigError(f"--gpu: unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    world = nodes * gpus_per_node
    validate(cfg, **transformer_limits(cfg.models), world_size=world)
    zero = ds.get("zero_optimization", {})
    if int(zero.get("stage", 0)) != 3:
        raise ConfigError(
            "plan: only ZeRO stage 3 ds_configs are modelled (the trainer's parallel layout needs stage 3 with sp > 1)"
        )
    run = run_iteration(cfg, world, trainable_dtype(ds))
    off_opt, off_param = _offload(ds, "offload_optimizer"), _offload(ds, "offload_param")
    states = [zero_model_states(r, run.modules[r], gpus_per_node, nodes, off_opt, off_param) for r in run.trainable]
    states += [frozen_model_states(n, run.modules[n]) for n in ("teacher", "vae", "raft") if n in run.modules]
    flops, calls = Flops(), {r: EngineCalls() for r in run.trainable}
    comm: dict[str, int] = {}
    for ph in run.phases:
        flops = flops + ph.flops.scaled(ph.repeats)
        for kind, b in ph.collectives.items():
            comm[kind] = comm.get(kind, 0) + b * ph.repeats
        for r, c in ph.engine_calls.items():
            calls[r].forwards += c.forwards * ph.repeats
            calls[r].grad_forwards += c.grad_forwards * ph.repeats
            calls[r].updates += c.updates * ph.repeats
    for r in run.trainable:
        params = sum(p.numel() for p in run.modules[r].parameters())
        for kind, b in zero3_traffic(params, calls[r], world).items():
            comm[f"{kind} ({r})"] = b
    peak = max(run.phases, key=lambda p: p.act_peak_bytes)
    return Plan(cfg, gpu, nodes, gpus_per_node, mfu, run, states, flops, comm, peak.act_peak_bytes, peak.name)


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
    lines += ["", "communication per rank and iteration"]
    for k, v in sorted(p.comm_bytes.items()):
        lines.append(f"  {k:<38} {_gib(v)}")
    lines += [
        "",
        f"estimated iteration time: {p.seconds:.1f} s (an estimate: {it.total / 1e12:.0f} TFLOP at {p.mfu:.0%} MFU of "
        f"{p.gpu.bf16_dense_flops / 1e12:.0f} TFLOP/s dense bf16; communication assumed overlapped)",
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
