"""Motion metrics while a run trains (`eval.every`): is motion going up?

Every `eval.every` iterations the generator samples a fixed set of prompts x seeds with the
few-step sampler (the same noise each time, so successive evaluations score the same
scenes), rank 0 decodes the clips and scores them with the evaluator's VBench metrics, and
the trainer logs the row as ``eval_*`` scalars next to that step's losses.

Every rank runs the generator's forward (ZeRO-3 gathers parameters collectively); only
rank 0 decodes and scores. Dynamics degree needs only RAFT, so without `eval.raft` it runs
on the training RAFT (`models.raft`) at VBench's 20 iterations: a curve comparable along
the run, not with published VBench numbers (say `eval.raft` for those). The other columns
are n/a until their weights are given (`VideoMetrics.from_weights`).
"""

from __future__ import annotations

import logging

import torch

from ..config import EvalConfig, VideoConfig
from ..motion.latents import latent_shape
from ..sampling.samplers import decode_to_uint8, sample_few_step
from ..sampling.schedule import FlowMatchSchedule, ModelFn, randn
from ..sampling.training_samples import fixed_prompts
from .dynamic_degree import DynamicDegree, raft_flow_fn
from .metrics import COLUMNS, EvalWeights, VideoMetrics, summarize

log = logging.getLogger(__name__)

TRAINING_RAFT = "training RAFT (models.raft), 20 iterations"


class TrainingEval:
    """The fixed evaluation set of a run and the metrics that score it (on rank 0)."""

    def __init__(
        self,
        cfg: EvalConfig,
        *,
        prompts_path: str,
        video: VideoConfig,
        device: torch.device,
        is_rank0: bool,
        training_raft: torch.nn.Module | None = None,
    ):
        self.seeds = list(cfg.seeds)
        self.video = video
        self.device = device
        self.is_rank0 = is_rank0
        self.embeds = fixed_prompts(prompts_path, cfg.num_prompts)
        self.metrics = None
        if is_rank0:
            weights = EvalWeights(
                raft=cfg.raft or None,
                amt=cfg.amt or None,
                clip=cfg.clip or None,
                aesthetic=cfg.aesthetic or None,
                musiq=cfg.musiq or None,
            )
            self.metrics = VideoMetrics.from_weights(weights, device, log=lambda msg: log.info("%s", msg))
            if self.metrics.dynamic is None and not cfg.raft and training_raft is not None:
                self.metrics.dynamic = DynamicDegree(raft_flow_fn(training_raft), device)
                self.metrics.weights["dynamics_degree"] = TRAINING_RAFT
                self.metrics.missing.pop("dynamics_degree", None)

    @torch.no_grad()
    def run(self, velocity_fn: ModelFn, schedule: FlowMatchSchedule, vae) -> dict[str, float]:
        """Sample and score the set. Collective: call on every rank; rank 0 returns the
        ``eval_<column>`` scalars that have a value (and eval_num_videos), the others {}."""
        embeds = self.embeds.to(self.device)
        clips = []
        for seed in self.seeds:
            gen = torch.Generator().manual_seed(seed)
            noise = randn(latent_shape(self.video, len(embeds)), gen, self.device)
            x0 = sample_few_step(velocity_fn, noise, embeds, schedule, generator=gen)
            if self.is_rank0:
                clips.append(decode_to_uint8(vae, x0))  # [B, F, H, W, 3] uint8
        if not self.is_rank0:
            return {}
        records = [self.metrics.video(clip.numpy(), self.video.fps) for batch in clips for clip in batch]
        row = summarize("generator", records, self.metrics.weights)
        out = {f"eval_{c}": float(row[c]) for c in COLUMNS if row.get(c) is not None}
        out["eval_num_videos"] = float(row["num_videos"])
        return out
