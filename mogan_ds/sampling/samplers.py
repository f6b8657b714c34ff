"""Samplers and the latent <-> pixel / prompt -> embedding glue around them.

* `sample_few_step`   the distilled generator: one network evaluation per entry of the
  distilled list, x0 prediction + re-noise with fresh noise in between, no CFG (DMD bakes
  guidance into the student). It *is* `FlowMatchSchedule.backward_simulation` at the last
  entry, so training's simulated inputs and inference follow the same code.
* `sample_teacher_cfg` the teacher: Euler flow matching on diffusers'
  FlowMatchEulerDiscreteScheduler(shift=teacher_shift) grid with WanPipeline's CFG
  v = v_u + g (v_c - v_u).
* `decode_to_uint8`  latents -> uint8 video the way WanPipeline decodes.
* `encode_prompts`   prompts -> UMT5 embeddings the way WanPipeline._get_t5_prompt_embeds does.

All latents are [B, 16, T, H/8, W/8] and the latent arithmetic is float32 (see
`mogan_ds.schedule`); networks are wrapped by `transformer_velocity_fn`, which casts to the
network's dtype and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.video import to_uint8
from ..models.builders import weights_dtype
from ..motion import latents as latents_lib
from .schedule import FlowMatchSchedule, Generators, ModelFn, compute_dtype


def transformer_velocity_fn(transformer) -> ModelFn:
    """`model_fn(x_t, t, cond) -> v` around a diffusers `WanTransformer3DModel` (or a DeepSpeed
    engine wrapping one): inputs cast to the network's dtype, velocity returned in float32.

    The timestep goes in as float32: Wan's time embedding upcasts it itself, and a bf16
    timestep would round 757 to 756.
    """
    module = getattr(transformer, "module", transformer)
    dtype = weights_dtype(module)  # not the first parameter's: bf16 Wan keeps some modules fp32

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = transformer(
            hidden_states=x_t.to(dtype),
            timestep=t.to(device=x_t.device, dtype=torch.float32),
            encoder_hidden_states=cond.to(device=x_t.device, dtype=dtype),
            return_dict=False,
        )[0]
        return out.float()

    return model_fn


@torch.no_grad()
def sample_few_step(
    model_fn: ModelFn, noise: torch.Tensor, cond: Any, schedule: FlowMatchSchedule, generator: Generators = None
) -> torch.Tensor:
    """x0 latents from the distilled generator: K evaluations for a K-entry list, no CFG.

    `generator` (one, or one per batch row) draws the re-noising noise; with the same noise
    and generator the result is bit-identical.
    """
    return schedule.backward_simulation(
        model_fn, noise, cond, index=schedule.num_denoising_steps - 1, noise_generator=generator
    ).x0


@torch.no_grad()
def sample_teacher_cfg(
    model_fn: ModelFn,
    noise: torch.Tensor,
    cond: Any,
    uncond: Any,
    schedule: FlowMatchSchedule,
    steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """x0 latents from the teacher: Euler steps x <- x + (sigma_{i+1} - sigma_i) * v.

    Matches FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps) + `step`
    exactly (see `FlowMatchSchedule.teacher_sigmas`), with WanPipeline's CFG
    v = v_uncond + g * (v_cond - v_uncond). g = 1 skips the unconditional pass. (The DMD
    loss's `cond + s*(cond - uncond)` with s = 3.5 is the same rule with g = s + 1.)
    Defaults come from the schedule (teacher_steps, teacher_guidance_scale, teacher_shift).
    A batch-1 `uncond` (e.g. the empty/negative prompt) is broadcast over the batch.
    """
    g = schedule.teacher_guidance_scale if guidance_scale is None else float(guidance_scale)
    timesteps, sigmas = schedule.teacher_sigmas(steps, shift, device=noise.device)
    batch = noise.shape[0]
    if g != 1.0 and isinstance(uncond, torch.Tensor) and uncond.shape[0] == 1 and batch > 1:
        uncond = uncond.expand(batch, *uncond.shape[1:])
    x = noise.to(compute_dtype(noise))
    for i in range(len(timesteps)):
        t = timesteps[i].expand(batch)
        v = model_fn(x, t, cond).to(x.dtype)
        if g != 1.0:
            v_u = model_fn(x, t, uncond).to(x.dtype)
            v = v_u + g * (v - v_u)
        x = x + (sigmas[i + 1] - sigmas[i]).to(x.dtype) * v
    return x


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> the VAE's raw latent space (WanPipeline's `latents / (1/std) + mean`); fp32."""
    return latents_lib.denormalize(latents, vae.config)


def normalize_latents(vae, raw: torch.Tensor) -> torch.Tensor:
    """Inverse of `denormalize_latents`: (raw - mean) / std, what the DiTs were trained on; fp32."""
    return latents_lib.normalize(raw, vae.config)


@torch.no_grad()
def decode_to_uint8(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents [B,16,T,h,w] -> uint8 video [B, F, H, W, 3] on the CPU, F = 4(T-1)+1.

    De-normalise as WanPipeline does, `vae.decode` in the VAE's dtype, clamp to [-1, 1],
    map to [0, 255] with rounding (diffusers' export truncates; rounding is the unbiased
    choice and differs by at most one level).
    """
    param = next(vae.parameters())
    raw = denormalize_latents(vae, latents.to(param.device)).to(param.dtype)
    video = vae.decode(raw, return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
    video = to_uint8(video)
    return video.permute(0, 2, 3, 4, 1).contiguous().cpu()


@torch.no_grad()
def encode_prompts(
    prompts: Sequence[str], tokenizer, text_encoder, max_length: int, device=None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """[N, max_length, D] UMT5 embeddings exactly as WanPipeline._get_t5_prompt_embeds makes them.

    The same encoding as the offline prompt shards (`mogan_ds.data.prompts.encode_texts`:
    diffusers' `prompt_clean`, padding to max_length with truncation, rows past each
    prompt's token count set to zero -- Wan's DiT was trained on zero-padded context), so
    samples rendered from text match samples rendered from precomputed embeddings.
    Returned in `dtype` (default float32) on `device` (default: the encoder's).
    """
    from ..data.prompts import encode_texts, pad_embedding

    enc_device = next(text_encoder.parameters()).device
    rows = encode_texts(list(prompts), tokenizer, text_encoder, max_length, device=enc_device)
    out = torch.stack([pad_embedding(r, max_length) for r in rows])
    return out.to(device=device or enc_device, dtype=dtype or torch.float32)
