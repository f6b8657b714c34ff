"""Sample videos during training: few-step generator samples with their RAFT flow side by side.

Every rank runs the generator (its ZeRO-3 forward is collective); rank 0 decodes, runs
RAFT, writes `<run_dir>/samples/step_XXXXXXXX_<i>.mp4` ([video | flow colour wheel]) and
logs them to wandb when enabled. Prompts and noise are fixed for the whole run, so
successive sample sets show the same scenes as training moves them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data.prompts import PromptEmbeddings
from .video_io import write_mp4
from .motion.flow import flow_to_rgb
from .sampling import decode_to_uint8, latent_shape, sample_few_step
from .schedule import randn

SAMPLE_SEED = 1234


def fixed_prompts(path: str, n: int) -> torch.Tensor:
    """The first `n` prompt embeddings of the corpus, identical on every rank."""
    batch = next(iter(PromptEmbeddings(path, 0, 1, SAMPLE_SEED, n)))
    return batch["embeds"]


@torch.no_grad()
def render_samples(trainer, out_dir: Path, step: int) -> list[Path]:
    cfg = trainer.cfg
    embeds = fixed_prompts(cfg.data.prompts, cfg.logging.num_samples).to(trainer.device)
    gen = torch.Generator().manual_seed(SAMPLE_SEED)
    noise = randn(latent_shape(cfg.video, len(embeds)), gen, trainer.device)
    x0 = sample_few_step(trainer.gen_fn, noise, embeds, trainer.schedule, generator=gen)
    if not trainer.rank0:
        return []
    video = decode_to_uint8(trainer.vae, x0)  # [B, F, H, W, 3] uint8
    panels = [video]
    raft = trainer.motion.raft if trainer.motion is not None else None
    if raft is not None:
        frames = video.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)  # [B, 3, F, H, W] in [-1, 1]
        flow = raft(frames.to(trainer.device))
        flow = torch.cat([flow, flow[:, :, -1:]], dim=2)  # one map per frame
        panels.append(flow_to_rgb(flow).permute(0, 2, 3, 4, 1).cpu())
    side_by_side = torch.cat(panels, dim=3)  # along the width
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, clip in enumerate(side_by_side):
        p = out_dir / f"step_{step:08d}_{i}.mp4"
        write_mp4(p, clip.numpy(), cfg.video.fps)
        trainer.metrics.log_video(step, f"sample_{i}", p)
        paths.append(p)
    return paths
