"""The MoGAN trainer: DMD + motion GAN on three DeepSpeed engines (paper sec. 4, appendix B).

`MoGANTrainer` owns a run: the process group, the networks and engines (`networks`,
`engines`, one `roles.RolePlan` per role), the data streams, the EMA, checkpoints, samples,
evaluation and the export. The iteration itself, the paper's four phases, is a
`step.MoGANStep` made by `step.build_step`, the same factory the planner and the GPU
benchmark call; `fit` calls it once per step. Between steps `fit` asks every rank whether
to stop (`preemption.StopRequest`: a signal, or the launcher gone); then all ranks save a
checkpoint of that step and `fit` returns the reason.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from .. import metric_names as M
from ..checkpoint.consolidate import generator_folder
from ..checkpoint.export import export_generator
from ..checkpoint.manager import CheckpointManager
from ..checkpoint.reshard import load_reshaped, needs_reshape, universal_ds_config
from ..checkpoint.storage import CheckpointReadError
from ..cli.errors import EXIT_REQUEUE
from ..config import Config, dump_yaml, to_dict, validate
from ..data.corpus import STAT_KEYS, MotionClipStream
from ..data.prompts import PromptEmbeddings, load_special_embeddings
from ..data.streaming import check_shard_source
from ..eval.in_training import TrainingEval
from ..models.builders import weights_dtype
from ..models.lora import AdapterOff, adapter_count
from ..models.presets import transformer_limits
from ..parallel import Topology, init_distributed, resolve_attention_backend
from ..sampling.training_samples import render_samples
from .determinism import set_deterministic
from .ema import ShardedEMA
from .engines import build_engines
from .metrics import MetricsLogger, peak_memory_gib
from .networks import build_networks, configure_trainable_attention
from .preemption import StopRequest
from .profiling import profiled_iteration
from .roles import load_ds_config, plan_roles
from .run_logging import setup_run_logging
from .step import NonFiniteLossError, build_step

log = logging.getLogger("mogan_ds")

#: Written into the run directory by rank 0 when a run stops early with a complete checkpoint.
STOPPED = "STOPPED"


def _params(module: torch.nn.Module) -> int:
    """Parameter count, also of a ZeRO-3-partitioned module (whose params hold ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


class MoGANTrainer:
    def __init__(self, cfg: Config, ds_config: str | Path, resume: bool = False, stop: StopRequest | None = None):
        # output.exit_signals: launch/train.py installs them before the set-up; otherwise fit does.
        self.stop = stop if stop is not None else StopRequest(cfg.output.exit_signals)
        set_deterministic(cfg.train.deterministic)  # before any CUDA library handle exists
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
        existing = self.ckpt.complete(include_damaged=True)
        if not resume and existing:
            # A fresh start would overwrite these step by step: refuse before anything is loaded.
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints (newest {existing[-1].name}): pass --resume to "
                "continue that run, or choose another output.run_dir"
            )
        # From here on: one console summary on rank 0, everything else in <run_dir>/logs/rank_N.log.
        setup_run_logging(self.run_dir, self.topo.rank)
        # The newest checkpoint that matches its manifest (a damaged one is reported and skipped).
        self._resume_from = None
        if resume:
            self._resume_from = self.ckpt.choose_resume(checksums=cfg.output.verify_on_resume == "checksums")
        # A checkpoint written on another dp x sp loads through DeepSpeed's universal format,
        # which the engines must be built for (`reshard`).
        self._reshape = self._reading(lambda: needs_reshape(self._resume_from, self.topo))
        if self._reshape:
            base_ds = universal_ds_config(base_ds)
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
            (self.run_dir / STOPPED).unlink(missing_ok=True)  # a previous run's stop, now being continued

        if cfg.gan.enabled:
            check_shard_source(cfg.data.shards)  # a wrong data.shards fails here, before any weights load
        special = load_special_embeddings(cfg.data.prompts, cfg.text.negative_prompt)
        # Fresh weights (the discriminator's heads) must be identical on every rank.
        torch.manual_seed(cfg.train.seed)
        # One build decision per role (its DeepSpeed dict, stage, partitioned or not), read by both builders.
        self.roles = plan_roles(cfg, base_ds, self.topo)
        nets = build_networks(cfg, self.topo, self.device, special["disc"], self.roles)
        self.engines = build_engines(self.roles, self.topo, nets)
        configure_trainable_attention(self.engines, cfg.models.attention_backend)
        # A partitioned teacher runs as its engine's module (ZeRO-3 gathers each layer in its
        # forward); it is never stepped or checkpointed (rebuilt from models.root on resume).
        self.teacher, self.vae, self.raft = nets.teacher, nets.vae, nets.raft
        micro, dp_rank, dp_size = cfg.train.micro_batch_size, self.topo.dp_rank, self.topo.dp_size
        self.prompts = PromptEmbeddings(cfg.data.prompts, dp_rank, dp_size, cfg.train.seed, micro)
        self.clips = None
        if cfg.gan.enabled:
            # uint8 across the loader: a quarter of float32's bytes; MoGANStep converts on the device.
            self.clips = MotionClipStream.from_config(
                cfg.data,
                cfg.video,
                dp_rank=dp_rank,
                dp_size=dp_size,
                seed=cfg.train.seed,
                batch_size=micro,
                output_dtype=torch.uint8,
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
        self.step, nonfinite_total = 0, 0
        if resume:
            nonfinite_total = self._reading(self._resume)
        self._saved_step = self.step  # nothing to save before the next step
        # Its loader workers start with the first batch; `close` shuts them down.
        self._clip_batches = iter(self.clips) if self.clips is not None else None
        self.iteration = build_step(
            cfg,
            self.topo,
            self.device,
            self.engines,
            teacher=self.teacher,
            vae=self.vae,
            raft=self.raft,
            negative=special["negative"].to(self.device),
            prompts=iter(self.prompts),
            clips=self._clip_batches,
            ema=self.ema,
            nonfinite_total=nonfinite_total,
        )
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
        engines = ", ".join(
            f"{r} {_params(e.module) / 1e6:,.1f}M"
            + (f" (LoRA: {adapter_count(e.module) / 1e6:,.2f}M trainable)" if self.roles[r].lora else "")
            for r, e in self.engines.items()
        )
        shared = isinstance(self.teacher, AdapterOff)
        frozen = ", ".join(
            f"{name} {_params(m) / 1e6:,.1f}M {weights_dtype(m)}".replace("torch.", "")
            + (" (ZeRO-3 partitions)" if name == "teacher" and self.engines.teacher is not None else "")
            for name, m in (("teacher", None if shared else self.teacher), ("vae", self.vae), ("raft", self.raft))
            if isinstance(m, torch.nn.Module)
        ) + ("; teacher = the fake score's frozen base with its adapter off" if shared else "")
        lines = [
            f"world {t.world_size} = dp {t.dp_size} x sp {t.sp_size} on {self.device.type}; attention: {attn}",
            f"engines (ZeRO partitions of): {engines}; frozen: {frozen}",
            f"batch {cfg.train.batch_size} (micro {cfg.train.micro_batch_size} x dp {t.dp_size} x accumulation "
            f"{self.iteration.gas}), "
            f"{cfg.train.max_steps} steps from step {self.step}",
        ]
        if g.enabled:
            w = self.iteration.motion.window
            lines.append(
                f"GAN: {g.space} space, window {w.length} of {w.num_latent} latent chunks from "
                f"{w.start if w.start == 'random' else f'chunk {w.start}'}, D batch "
                f"{g.disc_batch_size or cfg.train.batch_size} (accumulation {self.iteration.disc_gas}), approximate R1/R2 "
                f"lambda ({g.r1:g}, {g.r2:g}) x sigma^2 ({g.sigma:g}^2) = effective gradient-penalty weights "
                f"({g.r1 * g.sigma**2:g}, {g.r2 * g.sigma**2:g})"
            )
        lines.append(f"data: prompts {cfg.data.prompts}" + (f", clips {cfg.data.shards}" if g.enabled else ""))
        lines.append(f"outputs: {self.run_dir} (metrics.jsonl, checkpoints/, samples/, export/, logs/)")
        return "\n  ".join(lines)

    # ================================================================== the loop
    def fit(self) -> str | None:
        """Train to `train.max_steps` and export; returns None.

        Stopped early by `output.exit_signals` or the launcher's exit (`StopRequest`), it
        saves a checkpoint of the step it stopped at (all ranks agree on that step) and
        returns the reason; launch/train.py then exits with `EXIT_REQUEUE`.
        """
        cfg = self.cfg
        with self.stop.active():
            try:
                if self.rank0:
                    log.info("training from step %d to %d", self.step, cfg.train.max_steps)
                while self.step < cfg.train.max_steps:
                    reason = self.stop.agreed(self.device)  # collective: the same on every rank
                    if reason is not None:
                        self._stop_here(reason)
                        return reason
                    self._iteration()
                self.export()
            finally:
                self.metrics.close()
                self.close_data()
        return None

    def close_data(self) -> None:
        """Shut the clip loader's worker processes down now (they ignore the exit signals, so
        they are not left for the interpreter's exit to terminate)."""
        if self._clip_batches is not None:
            self._clip_batches.close()

    def _iteration(self) -> None:
        """One training step and what follows it at that step: logs, evaluation, samples, checkpoint."""
        cfg = self.cfg
        t0 = time.perf_counter()
        try:
            with self._profiler():
                logs = self.iteration.train_step(self.step)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e}. The newest complete checkpoint is {self.ckpt.latest()}") from None
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

    def _profiler(self):
        """torch.profiler around the iteration that `logging.profile_step` names (its row is step + 1), rank 0 only."""
        lg = self.cfg.logging
        if not (self.rank0 and lg.profile_step and self.step + 1 == lg.profile_step):
            return contextlib.nullcontext()
        return profiled_iteration(
            self.run_dir / "logs", lg.profile_step, self.device, lg.profile_rows, lg.profile_trace
        )

    def _stop_here(self, reason: str) -> None:
        """Collective: the checkpoint of this step (unless it exists), one line, the STOPPED note."""
        path = self.save_checkpoint() if self._saved_step != self.step else self.ckpt.latest()
        if not self.rank0:
            return
        kept = f"checkpoint {path}" if path is not None else "no checkpoint (no step was taken)"
        line = f"stopping at step {self.step} on {reason}: {kept}; exit code {EXIT_REQUEUE}, continue with --resume"
        log.warning("%s", line)
        # launch/slurm.sbatch requeues on this note as well as on the exit code (srun may report
        # a task it killed after another one exited instead).
        (self.run_dir / STOPPED).write_text(line + "\n")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """`eval.every`: the generator (its EMA when kept) samples the fixed evaluation set;
        rank 0 returns the eval_* motion metrics. Collective (every rank runs the forward)."""
        swap = self.ema.compute_swapped_in() if self.ema is not None else contextlib.nullcontext()
        with swap:
            return self.evaluator.run(self.iteration.gen_fn, self.iteration.schedule, self.vae)

    def _scalars(self, logs: dict, dt: float) -> dict:
        # Losses are averaged over data-parallel ranks so the log describes the global batch.
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float)))
        # On the device: NCCL reduces accelerator tensors only.
        vals = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and keys:
            dist.all_reduce(vals)
            vals /= dist.get_world_size()
        out = dict(zip(keys, vals.tolist()))
        out.update(self._data_counters())
        for role, engine in self.engines.items():
            out[M.lr_key(role)] = engine.get_lr()[0]
        out.update(
            {
                M.STEP_TIME: dt,
                M.SAMPLES_PER_S: self.cfg.train.batch_size / dt,
                M.PEAK_MEM_GIB: peak_memory_gib(self.device),
                M.NONFINITE_TOTAL: self.iteration.guard.total,
            }
        )
        return out

    def _data_counters(self) -> dict:
        """The clip stream's counters (`corpus.STAT_KEYS`: skipped samples, unreadable shards and
        their retries) summed over data-parallel ranks. Collective."""
        if self.clips is None:
            return {}
        stats = self.clips.stats()
        vals = torch.tensor([float(stats[k]) for k in STAT_KEYS], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(vals)
        vals /= self.topo.sp_size  # sequence-parallel peers read the same stream: count it once
        return {M.data_key(k): v for k, v in zip(STAT_KEYS, vals.tolist())}

    # ================================================================== checkpoints, samples, export
    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "prompts": self.prompts.state_dict(),
            "clips": self.clips.state_dict() if self.clips is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "nonfinite_total": self.iteration.guard.total,
            "layout": {"dp": self.topo.dp_size, "sp": self.topo.sp_size},
        }

    def save_checkpoint(self) -> Path:
        path = self.ckpt.save(self.step, self.engines, self._trainer_state())
        self._saved_step = self.step
        if self.rank0:
            log.info("checkpoint %s", self.ckpt.summary(path))
        return path

    def _reading(self, load):
        """`load()` of the resumed checkpoint; a file it cannot read marks the checkpoint damaged
        and the error says which checkpoint a restart uses instead."""
        try:
            return load()
        except CheckpointReadError as e:
            raise self.ckpt.unloadable(self._resume_from, e) from None

    def _resume(self) -> int:
        """Engines, streams, EMA and step from the newest complete checkpoint; returns its non-finite count."""
        path = self._resume_from
        if path is None:
            log.info("--resume: no complete checkpoint under %s; starting from step 0", self.ckpt.root)
            return 0
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
        # None: a reshape changed the data-parallel split, the streams start their new slots.
        if state["prompts"] is not None:
            self.prompts.load_state_dict(state["prompts"])
        if self.clips is not None and state["clips"] is not None:
            self.clips.load_state_dict(state["clips"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.rank0:
            log.info("resumed from %s at step %d", path, self.step)
        return state["nonfinite_total"]

    @torch.no_grad()
    def write_samples(self) -> None:
        """Few-step samples of fixed prompts with their RAFT flow side by side. Collective (ZeRO-3)."""
        render_samples(
            velocity_fn=self.iteration.gen_fn,
            schedule=self.iteration.schedule,
            vae=self.vae,
            raft=self.iteration.motion.raft if self.iteration.motion is not None else None,  # RaftFlow
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
        lora = self.roles["generator"].lora
        base = generator_folder(self.cfg) if lora is not None else None
        return export_generator(
            self.engines.generator.module, self.cfg.models.root, self.run_dir / "export", self.ema, lora=lora, base=base
        )
