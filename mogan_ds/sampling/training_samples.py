"""Sample videos written during training (`logging.sample_every`): few-step generator
samples with their RAFT flow side by side. (`generate.py` is the stand-alone sampler.)

Every rank runs the generator (its ZeRO-3 forward is collective); rank 0 decodes, runs
RAFT, writes `<run_dir>/samples/step_XXXXXXXX_<i>.mp4` ([video | flow colour wheel]) and
logs them to wandb when enabled. Prompts and noise are fixed for the whole run, so
successive sample sets show the same scenes as training moves them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..config import VideoConfig
from ..data.prompts import PromptEmbeddings
from ..data.video import to_unit, write_mp4
from ..motion.flow import flow_to_rgb
from ..motion.latents import latent_shape
from .samplers import decode_to_uint8, sample_few_step
from .schedule import FlowMatchSchedule, ModelFn, randn

SAMPLE_SEED = 1234


def fixed_prompts(path: str, n: int) -> torch.Tensor:
    """The first `n` prompt embeddings of the corpus, identical on every rank."""
    batch = next(iter(PromptEmbeddings(path, 0, 1, SAMPLE_SEED, n)))
    return batch["embeds"]


@torch.no_grad()
def render_samples(
    *,
    velocity_fn: ModelFn,
    schedule: FlowMatchSchedule,
    vae,
    raft: Callable[[torch.Tensor], torch.Tensor] | None,
    prompts_path: str,
    num_samples: int,
    video: VideoConfig,
    device: torch.device,
    is_rank0: bool,
    log_video: Callable[[int, str, Path], None],
    out_dir: Path,
    step: int,
) -> list[Path]:
    """Render `num_samples` fixed prompts with the generator; returns the mp4 paths (rank 0).

    `velocity_fn` is the generator's `model_fn(x_t, t, cond) -> v`; every rank must call
    this (a ZeRO-3 forward is collective). `raft` maps clips [B, 3, F, H, W] in [-1, 1] to
    flow [B, 2, F-1, H, W] (`motion.flow.RaftFlow`); None renders the video alone.
    `log_video(step, name, path)` hands each file to the metrics logger.
    """
    embeds = fixed_prompts(prompts_path, num_samples).to(device)
    gen = torch.Generator().manual_seed(SAMPLE_SEED)
    noise = randn(latent_shape(video, len(embeds)), gen, device)
    x0 = sample_few_step(velocity_fn, noise, embeds, schedule, generator=gen)
    if not is_rank0:
        return []
    clips = decode_to_uint8(vae, x0)  # [B, F, H, W, 3] uint8
    panels = [clips]
    if raft is not None:
        frames = to_unit(clips.permute(0, 4, 1, 2, 3))  # [B, 3, F, H, W] in [-1, 1]
        flow = raft(frames.to(device))
        flow = torch.cat([flow, flow[:, :, -1:]], dim=2)  # one map per frame
        panels.append(flow_to_rgb(flow).permute(0, 2, 3, 4, 1).cpu())
    side_by_side = torch.cat(panels, dim=3)  # along the width
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, clip in enumerate(side_by_side):
        p = out_dir / f"step_{step:08d}_{i}.mp4"
        write_mp4(p, clip.numpy(), video.fps, pad_odd=True)
        log_video(step, f"sample_{i}", p)
        paths.append(p)
    return paths
