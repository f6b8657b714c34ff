"""The MoGAN trainer: DMD + motion GAN on three DeepSpeed engines (paper sec. 4, appendix B).

One iteration runs the paper's four phases in order:
    (1) generator      <- DMD loss                      (teacher CFG vs fake score)
    (2) fake score     <- flow-matching loss, k times   (on detached generator samples)
    (3) generator      <- motion-GAN loss               (chunked decode -> RAFT -> D)
    (4) discriminator  <- logistic loss + approx. R1/R2 (real clips vs phase 3's fakes)

With `train.shared_generator_sample`, a step where (1) and (3) are both due fuses them into
one phase run first, "generator_dmd_gan": one generator sample per micro step, the DMD
loss + lambda_G * GAN loss on it, one backward, one generator step; (2) and (4) follow,
(4) on that sample's detached discriminator input.

Randomness is drawn from generators seeded by (seed, step, phase, micro step[, data-
parallel rank]): noise differs across data-parallel ranks and agrees across sequence-
parallel peers, choices that change the number of network calls (the distilled entry,
the decode window) agree across all ranks (ZeRO-3's collectives need the same call
sequence everywhere), and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from .. import metric_names as M
from ..checkpoint.export import export_generator
from ..checkpoint.manager import CheckpointManager
from ..checkpoint.reshard import load_reshaped, needs_reshape, universal_ds_config
from ..config import Config, dump_yaml, to_dict, validate
from ..data.corpus import MotionClipStream
from ..data.prompts import PromptEmbeddings, load_special_embeddings
from ..data.streaming import check_shard_source
from ..eval.in_training import TrainingEval
from ..losses.dmd import dmd_loss
from ..losses.flow_matching import flow_matching_loss
from ..losses.gan import approx_r1r2, d_logistic_loss, g_logistic_loss
from ..models.builders import weights_dtype
from ..models.presets import transformer_limits
from ..motion.latents import latent_shape
from ..motion.pipeline import MotionPath
from ..motion.window import Window
from ..parallel import Topology, init_distributed, resolve_attention_backend
from ..sampling.samplers import transformer_velocity_fn
from ..sampling.schedule import FlowMatchSchedule, randn
from ..sampling.training_samples import render_samples
from .ema import ShardedEMA
from .engines import build_engines, no_param_grads
from .metrics import MetricsLogger, peak_memory_gib
from .networks import build_networks, configure_trainable_attention
from .roles import gradient_accumulation_steps, load_ds_config, plan_roles
from .run_logging import setup_run_logging

log = logging.getLogger("mogan_ds")
PHASES = ("generator_dmd", "fake_score", "generator_gan", "discriminator")
# train.shared_generator_sample, at a step where both generator updates are due: (1)+(3) fused.
SHARED_PHASES = ("generator_dmd_gan", "fake_score", "discriminator")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the last complete checkpoint is untouched."""


def _seed(*key) -> int:
    # hashlib, not hash(): Python's str hash differs between processes.
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _params(module: torch.nn.Module) -> int:
    """Parameter count, also of a ZeRO-3-partitioned module (whose params hold ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def _mean_logs(rows: list[dict]) -> dict:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


class MoGANTrainer:
    def __init__(self, cfg: Config, ds_config: str | Path, resume: bool = False):
        # A dead or hung rank ends every other rank's wait after parallel.timeout_minutes.
        init_distributed(timedelta(minutes=cfg.parallel.timeout_minutes))
        self.cfg = cfg
        # The DiT's head/block counts from the weights folder's config.json: SP vs heads/world
        # and D's block count fail before any loading.
        validate(cfg, **transformer_limits(cfg.models), world_size=dist.get_world_size())
        self.topo = Topology.from_world(cfg.parallel.sp_size)
        self.device = torch.device(get_accelerator().current_device_name())
        self.rank0 = self.topo.rank == 0
        self.run_dir = Path(cfg.output.run_dir)
        base_ds = load_ds_config(ds_config)
        self.ckpt = CheckpointManager(self.run_dir, cfg.output.keep_checkpoints)
        if not resume and self.ckpt.latest() is not None:
            # A fresh start would overwrite these step by step: refuse before anything is loaded.
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints (newest {self.ckpt.latest().name}): pass --resume to "
                "continue that run, or choose another output.run_dir"
            )
        # From here on: one console summary on rank 0, everything else in <run_dir>/logs/rank_N.log.
        setup_run_logging(self.run_dir, self.topo.rank)
        # A checkpoint written on another dp x sp loads through DeepSpeed's universal format,
        # which the engines must be built for (`reshard`).
        self._reshape = resume and needs_reshape(self.ckpt.latest(), self.topo)
        if self._reshape:
            base_ds = universal_ds_config(base_ds)
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))

        if cfg.gan.enabled:
            check_shard_source(cfg.data.shards)  # a wrong data.shards fails here, before any weights load
        special = load_special_embeddings(cfg.data.prompts, cfg.text.negative_prompt)
        self.negative = special["negative"].to(self.device)
        # Fresh weights (the discriminator's heads) must be identical on every rank.
        torch.manual_seed(cfg.train.seed)
        # One build decision per role (its DeepSpeed dict, stage, partitioned or not), read by both builders.
        self.roles = plan_roles(cfg, base_ds, self.topo)
        nets = build_networks(cfg, self.topo, self.device, special["disc"], self.roles)
        self.engines = build_engines(self.roles, self.topo, nets)
        configure_trainable_attention(self.engines, cfg.models.attention_backend)
        # A partitioned teacher runs as its engine's module (ZeRO-3 gathers each layer in its
        # forward); it is never stepped or checkpointed (rebuilt from models.root on resume).
        self.teacher, self.vae = nets.teacher, nets.vae
        self.gen_fn = transformer_velocity_fn(self.engines.generator)
        self.fake_fn = transformer_velocity_fn(self.engines.fake_score) if cfg.dmd.enabled else None
        self.teacher_fn = transformer_velocity_fn(self.teacher) if cfg.dmd.enabled else None
        self.motion = (
            MotionPath.from_config(cfg.gan, cfg.latent_frames, self.vae, nets.raft, sp=self.topo)
            if cfg.gan.enabled
            else None
        )
        self.schedule = FlowMatchSchedule.from_config(cfg)
        self.gas = gradient_accumulation_steps(cfg, self.topo.dp_size)
        self.disc_gas = gradient_accumulation_steps(cfg, self.topo.dp_size, "discriminator")
        self.micro = cfg.train.micro_batch_size
        dp_rank, dp_size = self.topo.dp_rank, self.topo.dp_size
        self.prompts = PromptEmbeddings(cfg.data.prompts, dp_rank, dp_size, cfg.train.seed, self.micro)
        self.clips = None
        if cfg.gan.enabled:
            self.clips = MotionClipStream.from_config(
                cfg.data, cfg.video, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.train.seed, batch_size=self.micro
            )
        self.ema = ShardedEMA(self.engines.generator.module, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.evaluator = None
        if cfg.eval.every > 0:
            self.evaluator = TrainingEval(
                cfg.eval,
                prompts_path=cfg.data.prompts,
                video=cfg.video,
                device=self.device,
                is_rank0=self.rank0,
                training_raft=nets.raft,
            )
        self.step, self.nonfinite_streak, self.nonfinite_total = 0, 0, 0
        if resume:
            self._resume()
        self._prompt_iter = iter(self.prompts)
        self._clip_iter = iter(self.clips) if self.clips is not None else None
        self.metrics = MetricsLogger(
            self.run_dir,
            to_dict(cfg),
            self.rank0,
            cfg.train.max_steps,
            self.step,
            cfg.logging.wandb_mode,
            cfg.logging.wandb_project,
        )
        if self.rank0:
            log.info("%s", self.describe())

    def describe(self) -> str:
        """The run's set-up in a few lines, logged once on rank 0: layout, networks, batches,
        the GAN's effective settings, data sources and where outputs go."""
        cfg, g, t = self.cfg, self.cfg.gan, self.topo
        attn = resolve_attention_backend(cfg.models.attention_backend, self.engines.generator.module, self.device)
        engines = ", ".join(f"{r} {_params(e.module) / 1e6:,.1f}M" for r, e in self.engines.items())
        frozen = ", ".join(
            f"{name} {_params(m) / 1e6:,.1f}M {weights_dtype(m)}".replace("torch.", "")
            + (" (ZeRO-3 partitions)" if name == "teacher" and self.engines.teacher is not None else "")
            for name, m in (("teacher", self.teacher), ("vae", self.vae), ("raft", self.motion and self.motion.raft))
            if isinstance(m, torch.nn.Module)
        )
        lines = [
            f"world {t.world_size} = dp {t.dp_size} x sp {t.sp_size} on {self.device.type}; attention: {attn}",
            f"engines (ZeRO partitions of): {engines}; frozen: {frozen}",
            f"batch {cfg.train.batch_size} (micro {self.micro} x dp {t.dp_size} x accumulation {self.gas}), "
            f"{cfg.train.max_steps} steps from step {self.step}",
        ]
        if g.enabled:
            w = self.motion.window
            lines.append(
                f"GAN: {g.space} space, window {w.length} of {w.num_latent} latent chunks from "
                f"{w.start if w.start == 'random' else f'chunk {w.start}'}, D batch "
                f"{g.disc_batch_size or cfg.train.batch_size} (accumulation {self.disc_gas}), approximate R1/R2 "
                f"lambda ({g.r1:g}, {g.r2:g}) x sigma^2 ({g.sigma:g}^2) = effective gradient-penalty weights "
                f"({g.r1 * g.sigma**2:g}, {g.r2 * g.sigma**2:g})"
            )
        lines.append(f"data: prompts {cfg.data.prompts}" + (f", clips {cfg.data.shards}" if g.enabled else ""))
        lines.append(f"outputs: {self.run_dir} (metrics.jsonl, checkpoints/, samples/, export/, logs/)")
        return "\n  ".join(lines)

    # ================================================================== the iteration
    def train_step(self, step: int) -> dict:
        """One MoGAN iteration: the paper's four phases, each switchable with its own interval
        ((1) and (3) fused into one generator update with `train.shared_generator_sample`)."""
        cfg, logs, self._times = self.cfg, {}, {}
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
        return logs | {M.time_key(k): v for k, v in self._times.items()}

    # ------------------------------------------------------------------ (1) G <- DMD
    def generator_dmd_update(self, step: int) -> dict:
        rows = []
        for micro in range(self.gas):
            shared, local = self._rngs(step, "dmd", micro)
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
            shared, local = self._rngs(step, "fake_score", k, micro)
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
        window = self.motion.draw_window(self._rngs(step, "gan_window")[0])
        # D is a path for the gradient, not a learner, during G's update.
        with no_param_grads(self.engines.discriminator):
            for micro in range(self.gas):
                shared, local = self._rngs(step, "gan_g", micro)
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
        window = self.motion.draw_window(self._rngs(step, "gan_window")[0])
        with no_param_grads(self.engines.discriminator):
            for micro in range(self.gas):
                shared, local = self._rngs(step, "dmd", micro)
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
            d_real = self.motion.real(next(self._clip_iter)["video"].to(self.device), window).d_input
            real_logits, fake_logits = disc(torch.cat([d_real, d_fake])).split([len(d_real), len(d_fake)])
            loss, logs = d_logistic_loss(real_logits, fake_logits)
            noise = torch.Generator(self.device).manual_seed(
                _seed(self.cfg.train.seed, step, "r1r2", micro, self.topo.dp_rank)
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
        shared, local = self._rngs(step, "gan_d_extra", micro)
        x0 = self._generate(self._next_prompts(), shared, local, grad=False)
        return self.motion.fake(x0, window).d_input

    # ================================================================== helpers of the phases
    def _rngs(self, step: int, *phase) -> tuple[torch.Generator, torch.Generator]:
        """(shared by all ranks, local to this data-parallel rank) CPU generators for this draw site."""
        seed = self.cfg.train.seed
        shared = torch.Generator().manual_seed(_seed(seed, step, *phase))
        local = torch.Generator().manual_seed(_seed(seed, step, *phase, "dp", self.topo.dp_rank))
        return shared, local

    def _next_prompts(self) -> torch.Tensor:
        return next(self._prompt_iter)["embeds"].to(self.device)

    def _generate(
        self, embeds: torch.Tensor, shared: torch.Generator, local: torch.Generator, grad: bool
    ) -> torch.Tensor:
        """The generator's x0 at a distilled entry drawn identically on every rank (backward simulation)."""
        noise = randn(latent_shape(self.cfg.video, len(embeds)), local, self.device)
        with torch.set_grad_enabled(grad):
            return self.schedule.backward_simulation(
                self.gen_fn, noise, embeds, generator=shared, noise_generator=local
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
        if finite.item() < 1:
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
            log.warning(
                "step %d: non-finite %s loss (%s); update skipped (%d in a row)",
                self.step,
                role,
                loss.detach().float().item(),
                self.nonfinite_streak,
            )
            if self.nonfinite_streak >= self.cfg.train.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.nonfinite_streak} consecutive non-finite losses (last: {role}) at step {self.step}; "
                    f"stopping (train.max_nonfinite={self.cfg.train.max_nonfinite}). "
                    f"The newest complete checkpoint is {self.ckpt.latest()}"
                )
            return False
        self.nonfinite_streak = 0
        engine = getattr(self.engines, role)
        engine.backward(loss)
        engine.step()
        if role == "generator" and self.ema is not None and engine.was_step_applied():
            self.ema.update()
        return True

    def _timed(self, phase: str, fn, *args):
        """Run one phase and add its wall time (after an accelerator sync) to this iteration's."""
        t0 = time.perf_counter()
        result = fn(*args)
        get_accelerator().synchronize()
        self._times[phase] = self._times.get(phase, 0.0) + time.perf_counter() - t0
        return result

    # ================================================================== the loop
    def fit(self) -> None:
        cfg = self.cfg
        try:
            while self.step < cfg.train.max_steps:
                t0 = time.perf_counter()
                logs = self.train_step(self.step)
                self.step += 1
                dt = time.perf_counter() - t0
                # The same decision on every rank: _scalars and the evaluation are collective.
                evaluate = cfg.eval.every > 0 and self.step % cfg.eval.every == 0
                evals = self.evaluate() if evaluate else {}
                if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.max_steps or evaluate:
                    self.metrics.log(self.step, self._scalars(logs, dt) | evals)
                if cfg.logging.sample_every and self.step % cfg.logging.sample_every == 0:
                    self.write_samples()
                if self.step % cfg.output.checkpoint_every == 0 or self.step == cfg.train.max_steps:
                    self.save_checkpoint()
            self.export()
        finally:
            self.metrics.close()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """`eval.every`: the generator (its EMA when kept) samples the fixed evaluation set;
        rank 0 returns the eval_* motion metrics. Collective (every rank runs the forward)."""
        swap = self.ema.compute_swapped_in() if self.ema is not None else contextlib.nullcontext()
        with swap:
            return self.evaluator.run(self.gen_fn, self.schedule, self.vae)

    def _scalars(self, logs: dict, dt: float) -> dict:
        # Losses are averaged over data-parallel ranks so the log describes the global batch.
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float)))
        vals = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64)
        if dist.is_initialized() and keys:
            dist.all_reduce(vals)
            vals /= dist.get_world_size()
        out = dict(zip(keys, vals.tolist()))
        for role, engine in self.engines.items():
            out[M.lr_key(role)] = engine.get_lr()[0]
        out.update(
            {
                M.STEP_TIME: dt,
                M.SAMPLES_PER_S: self.cfg.train.batch_size / dt,
                M.PEAK_MEM_GIB: peak_memory_gib(self.device),
                M.NONFINITE_TOTAL: self.nonfinite_total,
            }
        )
        return out

    # ================================================================== checkpoints, samples, export
    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "prompts": self.prompts.state_dict(),
            "clips": self.clips.state_dict() if self.clips is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "nonfinite_total": self.nonfinite_total,
            "layout": {"dp": self.topo.dp_size, "sp": self.topo.sp_size},
        }

    def save_checkpoint(self) -> Path:
        path = self.ckpt.save(self.step, self.engines, self._trainer_state())
        if self.rank0:
            log.info("checkpoint %s", path)
        return path

    def _resume(self) -> None:
        path = self.ckpt.latest()
        if path is None:
            log.info("--resume: no complete checkpoint under %s; starting from step 0", self.ckpt.root)
            return
        if self._reshape:
            gen = self.engines.generator.module
            order = [(n, getattr(p, "ds_shape", p.shape)) for n, p in gen.named_parameters() if p.requires_grad]
            state = load_reshaped(path, self.engines, self.topo, order if self.ema is not None else None)
        else:
            state = self.ckpt.load(path, self.engines)
        layout = {"dp": self.topo.dp_size, "sp": self.topo.sp_size}
        if state["layout"] != layout:
            raise RuntimeError(f"{path} was written with layout {state['layout']}, this run has {layout}")
        self.step = state["step"]
        self.nonfinite_total = state["nonfinite_total"]
        # None: a reshape changed the data-parallel split, the streams start their new slots.
        if state["prompts"] is not None:
            self.prompts.load_state_dict(state["prompts"])
        if self.clips is not None and state["clips"] is not None:
            self.clips.load_state_dict(state["clips"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.rank0:
            log.info("resumed from %s at step %d", path, self.step)

    @torch.no_grad()
    def write_samples(self) -> None:
        """Few-step samples of fixed prompts with their RAFT flow side by side. Collective (ZeRO-3)."""
        render_samples(
            velocity_fn=self.gen_fn,
            schedule=self.schedule,
            vae=self.vae,
            raft=self.motion.raft if self.motion is not None else None,
            prompts_path=self.cfg.data.prompts,
            num_samples=self.cfg.logging.num_samples,
            video=self.cfg.video,
            device=self.device,
            is_rank0=self.rank0,
            log_video=self.metrics.log_video,
            out_dir=self.run_dir / "samples",
            step=self.step,
        )

    def export(self) -> Path | None:
        return export_generator(self.engines.generator.module, self.cfg.models.root, self.run_dir / "export", self.ema)
