"""One MoGAN iteration: the paper's four phases as one object with explicit dependencies.

    (1) generator      <- DMD loss                      (teacher CFG vs fake score)
    (2) fake score     <- flow-matching loss, k times   (on detached generator samples)
    (3) generator      <- motion-GAN loss               (chunked decode -> RAFT -> D)
    (4) discriminator  <- logistic loss + approx. R1/R2 (real clips vs phase 3's fakes)

With `train.shared_generator_sample`, a step where (1) and (3) are both due fuses them into
one phase run first, "generator_dmd_gan": one generator sample per micro step, the DMD
loss + lambda_G * GAN loss on it, one backward, one generator step; (2) and (4) follow,
(4) on that sample's detached discriminator input.

`build_step` is the one way to make a `MoGANStep`: the trainer calls it with its engines and
data streams, the planner with stand-in engines, fake tensors and fixed draws, the GPU
benchmark with full-size networks. What differs between them is passed in (the prompt and
clip sources, the window and distilled-entry draws), never set or patched afterwards.

Randomness is drawn from generators seeded by (seed, step, phase, micro step[, data-
parallel rank]): noise differs across data-parallel ranks and agrees across sequence-
parallel peers, choices that change the number of network calls (the distilled entry,
the decode window) agree across all ranks (ZeRO-3's collectives need the same call
sequence everywhere), and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from .. import metric_names as M
from ..config import Config
from ..data.video import to_unit
from ..losses.dmd import dmd_loss
from ..losses.flow_matching import flow_matching_loss
from ..losses.gan import approx_r1r2, d_logistic_loss, g_logistic_loss
from ..motion.latents import latent_shape
from ..motion.pipeline import MotionPath
from ..motion.window import Window
from ..sampling.samplers import transformer_velocity_fn
from ..sampling.schedule import FlowMatchSchedule, randn
from .engines import Engines, no_param_grads
from .profiling import phase_range
from .roles import gradient_accumulation_steps

log = logging.getLogger("mogan_ds")
PHASES = ("generator_dmd", "fake_score", "generator_gan", "discriminator")
# train.shared_generator_sample, at a step where both generator updates are due: (1)+(3) fused.
SHARED_PHASES = ("generator_dmd_gan", "fake_score", "discriminator")

WindowDraw = Callable[[torch.Generator], Window]
EntryDraw = Callable[[torch.Generator], int]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the last complete checkpoint is untouched."""


def draw_seed(*key) -> int:
    """A 63-bit seed from any key; hashlib, not hash(): Python's str hash differs between processes."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _mean_logs(rows: list[dict]) -> dict:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


@dataclass
class NonFiniteGuard:
    """Counts non-finite losses; `limit` in a row ends the run (`train.max_nonfinite`)."""

    limit: int
    streak: int = 0
    total: int = 0


@dataclass
class MoGANStep:
    """The four phases and what they read. Build with `build_step`.

    `prompts` yields ``{"embeds": [B, L, D]}`` batches of this data-parallel rank, `clips`
    ``{"video": uint8 [B, 3, F, H, W]}`` (converted to [-1, 1] floats on `device` here, so
    the loader moves a quarter of the bytes). `draw_window` / `draw_entry` turn a generator
    seeded alike on every rank into this step's decode window / distilled entry.
    """

    cfg: Config
    topo: object
    device: torch.device
    engines: Engines
    teacher: torch.nn.Module | None
    vae: torch.nn.Module
    motion: MotionPath | None
    schedule: FlowMatchSchedule
    negative: torch.Tensor
    prompts: Iterator[dict]
    clips: Iterator[dict] | None
    draw_window: WindowDraw | None
    draw_entry: EntryDraw
    gas: int
    disc_gas: int
    ema: object | None = None
    guard: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard(1))
    step: int = 0  # the iteration running now (log lines)
    times: dict = field(default_factory=dict)
    peaks: dict = field(default_factory=dict)

    def __post_init__(self):
        self.gen_fn = transformer_velocity_fn(self.engines.generator)
        dmd = self.cfg.dmd.enabled
        self.fake_fn = transformer_velocity_fn(self.engines.fake_score) if dmd else None
        self.teacher_fn = transformer_velocity_fn(self.teacher) if dmd else None

    # ================================================================== the iteration
    def train_step(self, step: int) -> dict:
        """One MoGAN iteration: the paper's four phases, each switchable with its own interval
        ((1) and (3) fused into one generator update with `train.shared_generator_sample`)."""
        cfg, logs, self.step, self.times, self.peaks = self.cfg, {}, step, {}, {}
        dmd_due = cfg.dmd.enabled and step % cfg.dmd.interval == 0
        gan_due = cfg.gan.enabled and step % cfg.gan.interval == 0
        fused = dmd_due and gan_due and cfg.train.shared_generator_sample
        if fused:
            g_logs, fakes, window = self._timed("generator_dmd_gan", self.generator_dmd_gan_update, step)  # (1)+(3)
            logs |= g_logs
        elif dmd_due:
            logs |= self._timed("generator_dmd", self.generator_dmd_update, step)  # (1)
        if cfg.dmd.enabled:
            for k in range(cfg.dmd.critic_updates):
                logs |= self._timed("fake_score", self.fake_score_update, step, k)  # (2)
        if gan_due and not fused:
            g_logs, fakes, window = self._timed("generator_gan", self.generator_gan_update, step)  # (3)
            logs |= g_logs
        if gan_due:
            logs |= self._timed("discriminator", self.discriminator_update, step, fakes, window)  # (4)
        logs |= {M.time_key(k): v for k, v in self.times.items()}
        return (
            logs
            | {M.peak_mem_key(k): a for k, (a, _) in self.peaks.items()}
            | {M.peak_reserved_key(k): r for k, (_, r) in self.peaks.items()}
        )

    # ------------------------------------------------------------------ (1) G <- DMD
    def generator_dmd_update(self, step: int) -> dict:
        rows = []
        for micro in range(self.gas):
            shared, local = self.rngs(step, "dmd", micro)
            embeds = self._next_prompts()
            x0 = self._generate(embeds, shared, local, grad=True)
            loss, logs = self._dmd_loss(x0, embeds, local)
            self._backward_step("generator", loss)
            rows.append(logs)
        return _mean_logs(rows)

    def _dmd_loss(self, x0: torch.Tensor, embeds: torch.Tensor, local: torch.Generator) -> tuple[torch.Tensor, dict]:
        """lambda_DMD * DMD loss of the sample x0 [B,C,T,H,W] (with grad); draws t and eps from `local`."""
        x_t, t, sigma, _ = self._noise(x0.detach(), local)
        with torch.no_grad():
            x0_real = self._teacher_cfg_x0(x_t, t, sigma, embeds)
            x0_fake = self.schedule.velocity_to_x0(x_t, self.fake_fn(x_t, t, embeds), sigma)
        return dmd_loss(x0, x0_real, x0_fake, self.cfg.dmd.weight)

    # ------------------------------------------------------------------ (2) f_fake <- FM
    def fake_score_update(self, step: int, k: int) -> dict:
        rows = []
        for micro in range(self.gas):
            shared, local = self.rngs(step, "fake_score", k, micro)
            embeds = self._next_prompts()
            with torch.no_grad():
                x0 = self._generate(embeds, shared, local, grad=False)
            x_t, t, _, eps = self._noise(x0, local)
            loss, logs = flow_matching_loss(self.fake_fn(x_t, t, embeds), x0, eps)
            self._backward_step("fake_score", loss)
            rows.append(logs)
        return _mean_logs(rows)

    # ------------------------------------------------------------------ (3) G <- motion GAN
    def generator_gan_update(self, step: int) -> tuple[dict, list[torch.Tensor], Window]:
        """Also returns the detached discriminator inputs of the fakes (phase 4 reuses them: no second decode)."""
        rows, fakes = [], []
        window = self.draw_window(self.rngs(step, "gan_window")[0])
        # D is a path for the gradient, not a learner, during G's update.
        with no_param_grads(self.engines.discriminator):
            for micro in range(self.gas):
                shared, local = self.rngs(step, "gan_g", micro)
                x0 = self._generate(self._next_prompts(), shared, local, grad=True)
                loss, logs, d_in = self._gan_loss(x0, window)
                self._backward_step("generator", loss)
                rows.append(logs)
                fakes.append(d_in)
        return _mean_logs(rows) | {M.GAN_WINDOW_START: window.start}, fakes, window

    def _gan_loss(self, x0: torch.Tensor, window: Window) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(lambda_G * G's logistic loss of the sample x0 [B,C,T,H,W], logs, D's input detached [B,...])."""
        d_in = self.motion.fake(x0, window).d_input
        loss, logs = g_logistic_loss(self.engines.discriminator.module(d_in))
        return self.cfg.gan.weight_g * loss, logs, d_in.detach()

    # ------------------------------------------------------------------ (1)+(3) on one sample
    def generator_dmd_gan_update(self, step: int) -> tuple[dict, list[torch.Tensor], Window]:
        """`train.shared_generator_sample`: phases (1) and (3) on one generator sample per micro step.

        The sample, its DMD timestep and noise come from phase (1)'s draw site ("dmd", micro),
        the window from phase (3)'s ("gan_window"); "gan_g" is not drawn, and one prompt batch
        per micro step is consumed instead of two. backward(lambda_DMD * L_DMD + lambda_G * L_G)
        gives the sum of the two phases' gradients at these parameters; the generator engine
        clips that sum and steps once; a non-finite sum skips the whole micro step (counted once).
        Logs: the two phases' keys. Returns what (3) returns.
        """
        rows, fakes = [], []
        window = self.draw_window(self.rngs(step, "gan_window")[0])
        with no_param_grads(self.engines.discriminator):
            for micro in range(self.gas):
                shared, local = self.rngs(step, "dmd", micro)
                embeds = self._next_prompts()
                x0 = self._generate(embeds, shared, local, grad=True)
                # DMD first: its teacher/fake-score forwards (no grad) end before the decode's graph exists.
                dmd, dmd_logs = self._dmd_loss(x0, embeds, local)
                gan, gan_logs, d_in = self._gan_loss(x0, window)
                self._backward_step("generator", dmd + gan)
                rows.append(dmd_logs | gan_logs)
                fakes.append(d_in)
        return _mean_logs(rows) | {M.GAN_WINDOW_START: window.start}, fakes, window

    # ------------------------------------------------------------------ (4) D <- logistic + R1/R2
    def discriminator_update(self, step: int, fakes: list[torch.Tensor], window: Window) -> dict:
        """gan.disc_batch_size clips per side: phase 3's fakes first, extra detached samples if D's batch is larger."""
        rows, g = [], self.cfg.gan
        disc = self.engines.discriminator
        for micro in range(self.disc_gas):
            d_fake = fakes[micro] if micro < len(fakes) else self._extra_fake(step, micro, window)
            d_real = self.motion.real(self._next_clips(), window).d_input
            real_logits, fake_logits = disc(torch.cat([d_real, d_fake])).split([len(d_real), len(d_fake)])
            loss, logs = d_logistic_loss(real_logits, fake_logits)
            noise = torch.Generator(self.device).manual_seed(
                draw_seed(self.cfg.train.seed, step, "r1r2", micro, self.topo.dp_rank)
            )
            reg, reg_logs = approx_r1r2(
                disc,
                d_real,
                d_fake,
                g.sigma,
                g.r1,
                g.r2,
                generator=noise,
                real_logits=real_logits,
                fake_logits=fake_logits,
            )
            self._backward_step("discriminator", g.weight_d * loss + reg)
            rows.append(logs | reg_logs)
        return _mean_logs(rows)

    @torch.no_grad()
    def _extra_fake(self, step: int, micro: int, window: Window) -> torch.Tensor:
        """A detached fake for D beyond the generator's batch: a fresh sample through the same window."""
        shared, local = self.rngs(step, "gan_d_extra", micro)
        x0 = self._generate(self._next_prompts(), shared, local, grad=False)
        return self.motion.fake(x0, window).d_input

    # ================================================================== helpers of the phases
    def rngs(self, step: int, *phase) -> tuple[torch.Generator, torch.Generator]:
        """(shared by all ranks, local to this data-parallel rank) CPU generators for this draw site."""
        seed = self.cfg.train.seed
        shared = torch.Generator().manual_seed(draw_seed(seed, step, *phase))
        local = torch.Generator().manual_seed(draw_seed(seed, step, *phase, "dp", self.topo.dp_rank))
        return shared, local

    def _next_prompts(self) -> torch.Tensor:
        return next(self.prompts)["embeds"].to(self.device)

    def _next_clips(self) -> torch.Tensor:
        """The next real clips as [-1, 1] floats [B, 3, F, H, W], converted on the device."""
        video = next(self.clips)["video"].to(self.device, non_blocking=True)
        return to_unit(video) if video.dtype == torch.uint8 else video

    def _generate(
        self, embeds: torch.Tensor, shared: torch.Generator, local: torch.Generator, grad: bool
    ) -> torch.Tensor:
        """The generator's x0 at a distilled entry drawn identically on every rank (backward simulation)."""
        noise = randn(latent_shape(self.cfg.video, len(embeds)), local, self.device)
        with torch.set_grad_enabled(grad):
            return self.schedule.backward_simulation(
                self.gen_fn, noise, embeds, index=self.draw_entry(shared), noise_generator=local
            ).x0

    def _noise(self, x0: torch.Tensor, local: torch.Generator):
        """x_t at a DMD timestep: (x_t, t [B], sigma [B,1,1,1,1], eps)."""
        t, sigma = self.schedule.sample_dmd_timestep(len(x0), local, self.device)
        sigma = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        eps = randn(x0.shape, local, self.device, x0.dtype)
        return self.schedule.add_noise(x0, eps, sigma), t, sigma, eps

    def _teacher_cfg_x0(self, x_t, t, sigma, embeds) -> torch.Tensor:
        """x0_real = cond + s (cond - uncond) (DMD's CFG form; s = dmd.guidance_scale), one batched call."""
        neg = self.negative.expand(len(x_t), *self.negative.shape[1:]).to(embeds.dtype)
        v_cond, v_uncond = self.teacher_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([embeds, neg])).chunk(2)
        # x0 = x_t - sigma v is linear in v: the guidance rule on x0 is the same rule on v.
        v = v_cond + self.cfg.dmd.guidance_scale * (v_cond - v_uncond)
        return self.schedule.velocity_to_x0(x_t, v, sigma)

    def _backward_step(self, role: str, loss: torch.Tensor) -> bool:
        """backward + step, unless the loss is non-finite on any rank (then every rank skips it).

        The check is all-reduced so all ranks take the same branch (ZeRO's collectives).
        With gradient accumulation, a skipped micro step's siblings still form the update.
        """
        finite = torch.isfinite(loss.detach()).all().float().reshape(1)
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        guard = self.guard
        if finite.item() < 1:
            guard.streak += 1
            guard.total += 1
            log.warning(
                "step %d: non-finite %s loss (%s); update skipped (%d in a row)",
                self.step,
                role,
                loss.detach().float().item(),
                guard.streak,
            )
            if guard.streak >= guard.limit:
                raise NonFiniteLossError(
                    f"{guard.streak} consecutive non-finite losses (last: {role}) at step {self.step}; "
                    f"stopping (train.max_nonfinite={guard.limit})"
                )
            return False
        guard.streak = 0
        engine = getattr(self.engines, role)
        engine.backward(loss)
        engine.step()
        if role == "generator" and self.ema is not None and engine.was_step_applied():
            self.ema.update()
        return True

    def _timed(self, phase: str, fn, *args):
        """Run one phase; add its wall time (after an accelerator sync) to this iteration's and, on
        an accelerator, keep its peak memory (GiB allocated, GiB reserved; the stats reset at its start)."""
        acc = get_accelerator()
        on_device = self.device.type != "cpu"  # the CPU accelerator's memory stats are the host's
        if on_device:
            acc.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with phase_range(phase):  # a profiler's range (logging.profile_step); it closes after the sync
            result = fn(*args)
            acc.synchronize()
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0
        if on_device:
            alloc, reserved = acc.max_memory_allocated() / 2**30, acc.max_memory_reserved() / 2**30
            old = self.peaks.get(phase, (0.0, 0.0))
            self.peaks[phase] = (max(old[0], alloc), max(old[1], reserved))
        return result


def build_step(
    cfg: Config,
    topo,
    device: torch.device,
    engines: Engines,
    *,
    teacher: torch.nn.Module | None,
    vae: torch.nn.Module,
    raft: torch.nn.Module | None,
    negative: torch.Tensor,
    prompts: Iterator[dict],
    clips: Iterator[dict] | None,
    ema=None,
    nonfinite_total: int = 0,
    draw_window: WindowDraw | None = None,
    draw_entry: EntryDraw | None = None,
    micro_steps: tuple[int, int] | None = None,
) -> MoGANStep:
    """The iteration of `cfg` on these engines and networks: the one factory of `MoGANStep`.

    `nonfinite_total`: non-finite losses counted before (a resumed run's). `draw_window`
    (default: the recipe's window spec, `gan.window_start`) and `draw_entry` (default: a
    uniform entry of the distilled list) are the two draws that change the number of
    network calls; `micro_steps` (default: from the batch sizes and dp) is (generator,
    discriminator) micro steps per update. The planner fixes all three to trace one
    representative micro step of each phase.
    """
    motion = MotionPath.from_config(cfg.gan, cfg.latent_frames, vae, raft, sp=topo) if cfg.gan.enabled else None
    schedule = FlowMatchSchedule.from_config(cfg)
    gas, disc_gas = micro_steps or (
        gradient_accumulation_steps(cfg, topo.dp_size),
        gradient_accumulation_steps(cfg, topo.dp_size, "discriminator"),
    )
    return MoGANStep(
        cfg=cfg,
        topo=topo,
        device=device,
        engines=engines,
        teacher=teacher,
        vae=vae,
        motion=motion,
        schedule=schedule,
        negative=negative,
        prompts=prompts,
        clips=clips,
        draw_window=draw_window or (motion.draw_window if motion is not None else None),
        draw_entry=draw_entry or schedule.draw_index,
        gas=gas,
        disc_gas=disc_gas,
        ema=ema,
        guard=NonFiniteGuard(cfg.train.max_nonfinite, total=nonfinite_total),
    )
