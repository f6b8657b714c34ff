"""Run one rank of a MoGAN iteration on fake tensors: the trainer's own phases, at the recipe's shape.

Networks are built on the meta device from the recipe's architecture (`models.root`'s
config.json files, else the `models.arch` preset; `mogan_ds.models.presets.architecture`),
cast there (diffusers' `.to(dtype)` fails after `to_empty` on fake tensors), prepared as
`mogan_ds.train.networks.build_networks` prepares them (frozen networks, gradient
checkpointing, Ulysses hooks), then materialised as fake CPU tensors with `to_empty`. The
teacher runs whole here whatever its ZeRO stage (a partitioned teacher computes the same
activations); a `PlanEngine` counts its forwards for its ZeRO-3 all-gathers.
No weight is read and no memory is allocated.

The iteration is the trainer's own `MoGANStep`, made by the same factory
(`mogan_ds.train.step.build_step`; no process group, no data, no DeepSpeed): `PlanEngine`s
in place of the DeepSpeed engines (backward = `loss.backward()`, step = no-op),
`PlanTopology` for rank 0 of dp x sp, prompt and clip iterators yielding fake tensors, the
real `FlowMatchSchedule` and `MotionPath`, and the draws fixed through the factory's
arguments. Its `generator_dmd_update`, `fake_score_update`, `generator_gan_update` and
`discriminator_update` then run unchanged. Deliberate differences, all stated in the
report:

* one micro step per phase (`gas = disc_gas = 1`) and one critic update: the others
  repeat the same work, so FLOPs and traffic are multiplied by the real counts and the
  activation peak is that of one micro step (gradient accumulation lives in the ZeRO
  partitions, i.e. in the model states);
* `.item()` returns 1 (`PlanTrace(stub_scalars=True)`): fake tensors hold no values. Logged losses are
  placeholders and the trainer's finite-loss check passes;
* a random GAN window start (`gan.window_start=random`) is fixed at the middle allowed start;
* the distilled entry of the backward simulation is fixed at (K-1)//2 of K entries (1 of
  3, the mean number of no-grad generator forwards for K = 3);
* sequence parallelism runs rank 0's shard through the real Ulysses hooks with local
  stand-ins for the collectives (`mogan_ds.plan.comm.LocalCollectives`).

LoRA roles (``models.lora.<role>``) get their adapters as the trainer injects them (the base
frozen: its weight gradients are neither computed nor counted); with the fake score on the
teacher's shared base the teacher is that module with its adapter off, and its FLOPs are
attributed to the teacher.

FLOPs and memory are measured in one pass by `trace.PlanTrace` (torch's FLOP formulas
and a live-bytes tracker in one dispatch mode, attribution without FlopCounterMode's module
tracker, which holds tensors).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import logging as diffusers_logging
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import Config
from ..models.builders import DTYPES, build_raft
from ..models.presets import architecture
from ..train.engines import Engines
from ..train.roles import gradient_accumulation_steps
from .comm import CollectiveBytes, EngineCalls, LocalCollectives, PlanTopology
from .flops import Flops
from .memo import BlockMemo, memo_types
from .memory import drop_param_grads
from .trace import ModuleLabels, PlanTrace

log = logging.getLogger("mogan_ds")


class PlanEngine:
    """Stands for a DeepSpeed engine in the trainer's phases: `module`, call, backward, step."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.calls = EngineCalls()
        self.counting = False
        module.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        if self.counting:
            self.calls.forwards += 1
            self.calls.grad_forwards += int(torch.is_grad_enabled())

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def parameters(self):
        return self.module.parameters()

    def backward(self, loss: torch.Tensor) -> None:
        if self.counting:
            self.calls.updates += 1
        loss.backward()

    def step(self) -> None:
        pass

    def was_step_applied(self) -> bool:
        return True


class _Endless:
    """An iterator yielding the same batch dict forever (fresh fake tensors each time)."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return self

    def __next__(self):
        return self.make()


@dataclass
class PhaseResult:
    name: str
    repeats: int  # how many times the trainer runs this per iteration
    flops: Flops = field(default_factory=Flops)  # one run
    act_peak_bytes: int = 0  # live activation bytes at the phase's peak (incl. earlier phases' survivors)
    collectives: dict[str, int] = field(default_factory=dict)  # SP bytes of one run
    engine_calls: dict[str, EngineCalls] = field(default_factory=dict)  # one run


@dataclass
class RunResult:
    phases: list[PhaseResult]
    modules: dict[str, torch.nn.Module]  # name -> module (fake parameters), for the model states
    trainable: list[str]
    gas: int
    disc_gas: int
    entry_index: int


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def build_plan_networks(cfg: Config, trainable_dtype: torch.dtype, device: str = "meta") -> dict[str, torch.nn.Module]:
    """Every network of the recipe, cast and prepared as `build_networks` does, with fresh weights.

    device="meta" (the planner): no memory; "cpu": real, randomly initialised modules of the
    same architectures (the calibration tests run the phases on them for real).
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from ..motion.discriminator import MotionDiscriminator

    arch, _ = architecture(cfg.models)
    tcfg = _strip(arch["transformer"])
    frozen = DTYPES[cfg.models.frozen_dtype]
    ckpt = cfg.models.gradient_checkpointing
    nets: dict[str, torch.nn.Module] = {}
    with torch.device(device):
        nets["generator"] = WanTransformer3DModel.from_config(tcfg)
        if cfg.dmd.enabled:
            nets["fake_score"] = WanTransformer3DModel.from_config(tcfg)
            nets["teacher"] = WanTransformer3DModel.from_config(tcfg)
        if cfg.gan.enabled:
            backbone = WanTransformer3DModel.from_config({**tcfg, "num_layers": cfg.gan.disc_blocks})
            prompt = torch.zeros(1, cfg.text.max_length, tcfg["text_dim"])
            nets["discriminator"] = MotionDiscriminator(
                backbone, prompt, cfg.gan.head_blocks, cfg.gan.head_dim, cfg.gan.disc_timestep
            )
            if cfg.gan.space == "flow":
                nets["raft"] = build_raft(arch["raft_arch"])
        nets["vae"] = AutoencoderKLWan.from_config(_strip(arch["vae"]))
    # diffusers warns on every `.to(dtype)` of a model with fp32-kept modules; DeepSpeed's bf16
    # cast and `freeze` do the same cast in the trainer, so the warning says nothing here.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        _cast(nets, trainable_dtype, frozen)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    _adapt(cfg, nets, device)
    if ckpt:
        for name in ("generator", "fake_score"):
            if name in nets:
                nets[name].enable_gradient_checkpointing()
        if "discriminator" in nets:
            nets["discriminator"].backbone.enable_gradient_checkpointing()
    return nets


def _adapt(cfg: Config, nets: dict[str, torch.nn.Module], device: str) -> None:
    """LoRA roles as `build_networks` makes them: adapters injected (the base frozen), D's into its backbone;
    with a shared base the teacher is the fake score's module with its adapter off (`AdapterOff`)."""
    from ..models.lora import AdapterOff, add_lora
    from ..train.roles import lora_settings

    with torch.device(device):
        for role in ("generator", "fake_score", "discriminator"):
            lora = lora_settings(cfg, role)
            if lora is not None and role in nets:
                target = nets[role].backbone if role == "discriminator" else nets[role]
                add_lora(target, lora, cfg.train.seed, role)
    shared = lora_settings(cfg, "fake_score")
    if "fake_score" in nets and shared is not None and shared.share_teacher_base:
        nets["teacher"] = AdapterOff(nets["fake_score"])


def _cast(nets: dict[str, torch.nn.Module], trainable_dtype: torch.dtype, frozen: torch.dtype) -> None:
    for name, m in nets.items():
        if name in ("generator", "fake_score", "discriminator"):
            m.to(trainable_dtype).train()  # the DeepSpeed engine casts to the ds_config's precision
        elif name == "raft":
            m.float().requires_grad_(False).eval()  # RaftFlow keeps RAFT in fp32 (it fails in bf16)
        else:
            m.to(frozen).requires_grad_(False).eval()


def _parallelize(nets: dict[str, torch.nn.Module], topo: PlanTopology) -> None:
    """The trainer's Ulysses hooks (networks.build_networks), with `topo`'s stand-in SP group."""
    from ..models.lora import AdapterOff
    from ..parallel import parallelize_wan
    from ..train.networks import parallelize_discriminator

    for name in ("generator", "fake_score", "teacher"):
        if name in nets and not isinstance(nets[name], AdapterOff):  # a shared teacher runs the fake score's hooks
            parallelize_wan(nets[name], topo)
    if "discriminator" in nets:
        parallelize_discriminator(nets["discriminator"], topo)


def _make_step(cfg: Config, nets: dict[str, torch.nn.Module], topo: PlanTopology, text_dim: int, entry_index: int):
    """The trainer's own `MoGANStep` (`build_step`), on `PlanEngine`s, fake batches and fixed draws."""
    from ..motion.window import RANDOM, Window, WindowSpec
    from ..train.step import build_step

    engines = Engines(
        generator=PlanEngine(nets["generator"]),
        fake_score=PlanEngine(nets["fake_score"]) if "fake_score" in nets else None,
        discriminator=PlanEngine(nets["discriminator"]) if "discriminator" in nets else None,
        # Counts the teacher's forwards (its ZeRO-3 all-gathers when partitioned; a replica gathers nothing).
        teacher=PlanEngine(nets["teacher"]) if "teacher" in nets else None,
    )
    draw_window = None
    if cfg.gan.enabled:
        spec = WindowSpec.from_config(cfg.gan, cfg.latent_frames)
        if spec.start == RANDOM:
            # A random start is fixed at the middle of the allowed starts (chunks before the
            # window are decoded without grad, so the start changes the cost a little).
            fixed = Window((spec.min_start + spec.num_latent - spec.length) // 2, spec.length)
            draw_window = lambda generator: fixed  # noqa: E731
    L, v, micro = cfg.text.max_length, cfg.video, cfg.train.micro_batch_size
    clip = (micro, 3, v.num_frames, v.height, v.width)
    return build_step(
        cfg,
        topo,
        torch.device("cpu"),
        engines,
        # The step calls the teacher's module itself (a partitioned one through its engine's hooks).
        teacher=nets.get("teacher"),
        vae=nets["vae"],
        raft=nets.get("raft"),
        negative=torch.zeros(1, L, text_dim),
        prompts=_Endless(lambda: {"embeds": torch.zeros(micro, L, text_dim)}),
        clips=_Endless(lambda: {"video": torch.zeros(clip, dtype=torch.uint8)}),
        draw_window=draw_window,
        draw_entry=lambda generator: entry_index,
        micro_steps=(1, 1),
    )


def _labels(step, nets) -> dict[torch.nn.Module, str]:
    labels = {nets["generator"]: "generator"}
    for name in ("fake_score", "teacher", "discriminator"):
        if name in nets:
            labels[nets[name]] = name
    vae = nets["vae"]
    labels.update(
        {
            vae.decoder: "vae_decode",
            vae.post_quant_conv: "vae_decode",
            vae.encoder: "vae_encode",
            vae.quant_conv: "vae_encode",
        }
    )
    if step.motion is not None and step.motion.raft is not None:
        labels[step.motion.raft] = "raft"
    return labels


def _phase_plan(cfg: Config, gas: int, disc_gas: int) -> list[tuple[str, int]]:
    """(phase, repeats per iteration) in the order train_step runs them (every phase due at step 0)."""
    out = []
    # train.shared_generator_sample: (1) and (3) run as one phase on one sample (train_step's "generator_dmd_gan").
    fused = cfg.train.shared_generator_sample and cfg.dmd.enabled and cfg.gan.enabled
    if cfg.dmd.enabled:
        out += [("generator_dmd_gan" if fused else "generator_dmd", gas), ("fake_score", gas * cfg.dmd.critic_updates)]
    if cfg.gan.enabled:
        out += ([] if fused else [("generator_gan", gas)]) + [("discriminator", min(gas, disc_gas))]
        if disc_gas > gas:
            out.append(("discriminator_extra_fake", disc_gas - gas))
    return out


def _run_phase(step, name: str, state: dict) -> None:
    if name == "generator_dmd":
        step.generator_dmd_update(0)
    elif name == "fake_score":
        step.fake_score_update(0, 0)
    elif name == "generator_gan":
        _, state["fakes"], state["window"] = step.generator_gan_update(0)
    elif name == "generator_dmd_gan":
        _, state["fakes"], state["window"] = step.generator_dmd_gan_update(0)
    elif name == "discriminator":
        step.discriminator_update(0, state["fakes"], state["window"])
    elif name == "discriminator_extra_fake":
        # micro steps beyond the generator's batch: D's fake is a fresh detached sample (_extra_fake)
        step.discriminator_update(0, [], state["window"])
    else:
        raise ValueError(name)


@dataclass
class Prepared:
    """The iteration of rank 0 (`MoGANStep` on stand-in engines) with its networks and the phases to run."""

    step: Any
    nets: dict[str, torch.nn.Module]
    phases: list[PhaseResult]
    labels: dict[torch.nn.Module, str]
    gas: int
    disc_gas: int
    entry_index: int


def prepare(
    cfg: Config, world_size: int, trainable_dtype: torch.dtype = torch.bfloat16, device: str = "meta"
) -> Prepared:
    """Networks (with the SP hooks for `cfg.parallel.sp_size`) and the trainer's step object around them.

    With sp > 1 the phases must run inside `LocalCollectives`.
    """
    topo = PlanTopology(world_size, cfg.parallel.sp_size)
    gas = gradient_accumulation_steps(cfg, topo.dp_size)
    disc_gas = gradient_accumulation_steps(cfg, topo.dp_size, "discriminator") if cfg.gan.enabled else 0
    nets = build_plan_networks(cfg, trainable_dtype, device)
    _parallelize(nets, topo)
    text_dim = int(architecture(cfg.models)[0]["transformer"]["text_dim"])
    entry_index = (len(cfg.schedule.denoising_timesteps) - 1) // 2
    # Built before to_empty: MotionPath's RaftFlow casts RAFT, which fails on fake parameters.
    step = _make_step(cfg, nets, topo, text_dim, entry_index)
    phases = [PhaseResult(n, r) for n, r in _phase_plan(cfg, gas, disc_gas)]
    return Prepared(step, nets, phases, _labels(step, nets), gas, disc_gas, entry_index)


def trace_pass(
    prep: Prepared, counter: CollectiveBytes | None = None, memo: bool = False, stub_scalars: bool = False
) -> BlockMemo | None:
    """Run every phase once under `PlanTrace`: fills each phase's FLOPs, activation peak, SP
    collective bytes and engine calls in one pass.

    Parameter gradients are freed as soon as they are complete (ZeRO-3 moves them into
    the partitions, counted with the model states). With `memo`, identical DiT and RAFT
    update blocks are measured once and replayed (`memo.BlockMemo`); returns the memo.
    `stub_scalars`: `.item()` returns 1 (fake tensors; see `PlanTrace`).
    """
    engines = dict(prep.step.engines.items())
    hooks = drop_param_grads(e.module for e in engines.values())
    if prep.step.engines.teacher is not None:  # frozen: forwards counted, no grads to drop
        engines["teacher"] = prep.step.engines.teacher
    # A shared-base teacher runs the fake score's module: its operators are the teacher's.
    labels = ModuleLabels(prep.labels, claiming=("teacher",))
    state: dict[str, Any] = {}
    blocks = None
    try:
        with PlanTrace(labels, stub_scalars) as mode:
            if memo:
                blocks = BlockMemo(mode, counter, prep.nets.values(), memo_types())
            for ph in prep.phases:
                if counter is not None:
                    counter.bytes.clear()
                for e in engines.values():
                    e.calls, e.counting = EngineCalls(), True
                mode.reset_peak()
                mode.take_flops()
                _run_phase(prep.step, ph.name, state)
                ph.flops = mode.take_flops()
                ph.act_peak_bytes = mode.peak
                ph.collectives = dict(counter.bytes) if counter is not None else {}
                ph.engine_calls = {r: e.calls for r, e in engines.items()}
                for e in engines.values():
                    e.counting = False
    finally:
        for h in hooks:
            h.remove()
        labels.remove()
        if blocks is not None:
            blocks.remove()
    return blocks


def run_iteration(cfg: Config, world_size: int, trainable_dtype: torch.dtype = torch.bfloat16) -> RunResult:
    """Build the networks on fake tensors and run every phase of one iteration for rank 0 (one pass)."""
    counter = CollectiveBytes()
    with LocalCollectives(counter):
        prep = prepare(cfg, world_size, trainable_dtype)
        with FakeTensorMode(allow_non_fake_inputs=True):
            for m in prep.nets.values():
                m.to_empty(device="cpu")
            trace_pass(prep, counter, memo=True, stub_scalars=True)
    trainable = [r for r in ("generator", "fake_score", "discriminator") if r in prep.nets]
    return RunResult(prep.phases, prep.nets, trainable, prep.gas, prep.disc_gas, prep.entry_index)
