"""Videos from a work folder's models as the evaluator renders them (stages 4 and 7, probe_d.py):
the tiny text encoder's caption embeddings, the seeded noise, the few-step or CFG sampler and
the VAE's decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .workdir import WorkFolder


def text_models(wf: WorkFolder):
    """Stage 1's tiny tokenizer and text encoder."""
    from mogan_ds.models.builders import load_text_encoder, load_tokenizer

    tiny = wf.work / "data" / "tiny" / "wan"
    return load_tokenizer(str(tiny / "tokenizer")), load_text_encoder(str(tiny / "text_encoder"), torch.float32)


def embed(wf: WorkFolder, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption embeddings and the negative prompt's, as the trainer's prompt folder holds them."""
    from mogan_ds.config import TextConfig
    from mogan_ds.sampling.samplers import encode_prompts

    tok, enc = text_models(wf)
    length = wf.recipes["data"]["max_length"]
    embeds = encode_prompts(texts, tok, enc, length)
    negative = encode_prompts([TextConfig().negative_prompt], tok, enc, length)
    return embeds, negative


@torch.no_grad()
def render_videos(
    wf: WorkFolder, transformer_dir: Path, teacher: bool, texts: list[str], seeds: list[int], cfg
) -> list[np.ndarray]:
    """Videos [len(seeds) x len(texts)] (seed-major) exactly as the evaluator renders them:
    noise from generate.sample_seed(seed, prompt index), few-step or CFG sampler, the VAE's decode.
    On the work folder's device, in fp32 (no autocast: the rows are measured as the models are);
    the noise is drawn on the CPU and moved, so a seed gives the same noise on every device."""
    from mogan_ds.models.builders import load_transformer, load_vae
    from mogan_ds.motion.latents import latent_shape
    from mogan_ds.sampling.generate import sample_seed
    from mogan_ds.sampling.samplers import decode_to_uint8, sample_few_step, sample_teacher_cfg
    from mogan_ds.sampling.samplers import transformer_velocity_fn as vfn
    from mogan_ds.sampling.schedule import FlowMatchSchedule, randn

    schedule = FlowMatchSchedule.from_config(cfg)
    dev = wf.device
    model = load_transformer(str(transformer_dir), torch.float32).eval().requires_grad_(False).to(dev)
    vae = load_vae(str(wf.models / "wan" / "vae"), torch.float32).eval().to(dev)
    fn = vfn(model)
    embeds, negative = (e.to(dev) for e in embed(wf, texts))
    out = []
    for seed in seeds:
        for i in range(len(texts)):
            g = torch.Generator("cpu").manual_seed(sample_seed(seed, i))
            noise = randn(latent_shape(cfg.video, 1), [g], dev)
            if teacher:
                lat = sample_teacher_cfg(fn, noise, embeds[i : i + 1], negative, schedule)
            else:
                lat = sample_few_step(fn, noise, embeds[i : i + 1], schedule, generator=[g])
            out.append(decode_to_uint8(vae, lat)[0].numpy())
    return out
