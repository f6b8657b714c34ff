"""The DiT motion discriminator (paper section 4.3, appendix A).

Backbone: the first N blocks of a Wan DiT (`WanTransformer3DModel` built with
``num_layers=N``, initialised from the teacher; later blocks are never instantiated),
run at a fixed diffusion timestep with the fixed prompt embedding of
"a video with good motion" (computed once by the caller, stored here as a buffer so a
checkpoint carries it). Its input is a Wan latent video: the VAE encoding of the
3-channel motion tensor (``gan.space=flow``), or the generator's latents themselves
(``gan.space=latent``, the "w/o optical flow" ablation).

Heads (Seaweed-APT style "P-branches"): after each block listed in ``head_blocks`` a
`PredictionHead` lets one learned query token cross-attend to that block's tokens and
passes the result through a small MLP; the head outputs are concatenated and a final MLP
gives one logit per clip.

The backbone's own submodules (rope, patch_embedding, condition_embedder, blocks) are
called exactly as `WanTransformer3DModel.forward` calls them, so anything that hooks them
(attention backends, the sequence-parallel wrapper) applies unchanged. Each head is a
separate module whose first argument is the token tensor [B, N_tokens, dim]: a
sequence-parallel wrapper gathers the token shards at the heads' inputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file
from torch import nn

from mogan_ds.models.builders import load_transformer


class Fp32Linear(nn.Linear):
    """nn.Linear that computes in fp32 whatever its weights' dtype (same parameters, same state dict).

    The final MLP runs in it so the logit is not rounded to bf16. Approximate R1/R2 need
    D(m) - D(m + sigma n), an O(sigma |grad D|) difference: a bf16 logit has a resolution
    of 2^-8 of its size (4e-3 at |D| = 1) and rounds small gaps to exactly 0, switching the
    penalty off just as it works (small |grad D|); with a bf16 engine the tiny recipe's
    r1_gap / r2_gap were 0.0. The upcast weights stay the engine's bf16 parameters (their
    gradient is cast back), and ZeRO-3 gathers them for this module's own forward as usual.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), self.weight.float(), bias)


class PredictionHead(nn.Module):
    """Tokens [B, N, dim] -> features [B, hidden]: learned-query cross-attention + MLP."""

    def __init__(self, dim: int, num_heads: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.norm = nn.LayerNorm(dim, eps=eps)  # block outputs are un-normalised residual streams
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim, eps=eps), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm(tokens.to(self.query.dtype))
        q = self.query.expand(tokens.shape[0], -1, -1)
        pooled, _ = self.attn(q, kv, kv, need_weights=False)
        return self.mlp(pooled.squeeze(1))


class MotionDiscriminator(nn.Module):
    """Wan latents [B, C, T, h, w] -> one logit per clip [B] (fp32)."""

    def __init__(self, backbone, prompt_embeds: torch.Tensor, head_blocks: list[int], head_dim: int, timestep: int = 0):
        super().__init__()
        num_blocks = len(backbone.blocks)
        head_blocks = [int(b) for b in head_blocks]
        if (
            not head_blocks
            or sorted(set(head_blocks)) != head_blocks
            or not all(0 <= b < num_blocks for b in head_blocks)
        ):
            raise ValueError(f"head_blocks must be increasing distinct indices in [0, {num_blocks}), got {head_blocks}")
        if head_blocks[-1] != num_blocks - 1:
            # Blocks after the last head would never run: dead weights, and parameters that
            # never get a gradient upset ZeRO-3. Build only the blocks that are used.
            raise ValueError(
                f"the backbone has {num_blocks} blocks but the last head is after block {head_blocks[-1]}: "
                f"set gan.disc_blocks={head_blocks[-1] + 1}"
            )
        cfg = backbone.config
        if prompt_embeds.dim() == 2:
            prompt_embeds = prompt_embeds.unsqueeze(0)
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != 1 or prompt_embeds.shape[-1] != cfg.text_dim:
            raise ValueError(f"prompt embedding must be [1, L, {cfg.text_dim}], got {tuple(prompt_embeds.shape)}")
        # The DiT's output head (norm_out/proj_out/scale_shift_table) is never run; drop its
        # weights so that no trainable parameter goes without a gradient.
        backbone.proj_out = None
        backbone.scale_shift_table = None
        self.backbone = backbone
        self.head_blocks = head_blocks
        self.head_dim = int(head_dim)
        self.timestep = int(timestep)
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.heads = nn.ModuleList(
            PredictionHead(dim, cfg.num_attention_heads, self.head_dim, cfg.eps) for _ in head_blocks
        )
        self.final = nn.Sequential(  # in fp32: see Fp32Linear
            Fp32Linear(len(head_blocks) * self.head_dim, self.head_dim), nn.SiLU(), Fp32Linear(self.head_dim, 1)
        )
        self.register_buffer("prompt_embeds", prompt_embeds.detach().clone(), persistent=True)

    # ------------------------------------------------------------------ config / io
    @property
    def config(self) -> dict:
        """Everything needed to rebuild this module before loading its state dict."""
        return {
            "backbone": {k: v for k, v in dict(self.backbone.config).items() if not k.startswith("_")},
            "head_blocks": list(self.head_blocks),
            "head_dim": self.head_dim,
            "timestep": self.timestep,
            "prompt_shape": list(self.prompt_embeds.shape),
        }

    @classmethod
    def from_config(cls, config: dict) -> MotionDiscriminator:
        """An uninitialised discriminator of this shape (load a state dict into it)."""
        backbone = WanTransformer3DModel.from_config(config["backbone"])
        return cls(
            backbone, torch.zeros(config["prompt_shape"]), config["head_blocks"], config["head_dim"], config["timestep"]
        )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """config.json + model.safetensors (weights, heads and the prompt-embedding buffer)."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(p / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None) -> MotionDiscriminator:
        p = Path(path)
        model = cls.from_config(json.loads((p / "config.json").read_text()))
        model.load_state_dict(load_file(str(p / "model.safetensors")), strict=True)
        return model if dtype is None else model.to(dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        batch = latents.shape[0]
        x = latents.to(bb.patch_embedding.weight.dtype)
        # Same order and calls as WanTransformer3DModel.forward, up to the last head.
        rotary_emb = bb.rope(x)
        hidden = bb.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        timestep = torch.full((batch,), float(self.timestep), device=x.device)
        prompt = self.prompt_embeds.expand(batch, -1, -1).to(x.dtype)
        _, timestep_proj, context, _ = bb.condition_embedder(timestep, prompt, None)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        checkpointing = torch.is_grad_enabled() and bb.gradient_checkpointing
        features = []
        head_iter = iter(zip(self.head_blocks, self.heads))
        next_head = next(head_iter)
        for i, block in enumerate(bb.blocks):
            if checkpointing:
                hidden = bb._gradient_checkpointing_func(block, hidden, context, timestep_proj, rotary_emb)
            else:
                hidden = block(hidden, context, timestep_proj, rotary_emb)
            if i == next_head[0]:
                features.append(next_head[1](hidden))
                next_head = next(head_iter, (None, None))
        return self.final(torch.cat(features, dim=-1)).squeeze(-1).float()


def build_discriminator(
    teacher_transformer_path: str | os.PathLike,
    gan_cfg,
    prompt_embeds: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
) -> MotionDiscriminator:
    """D from the teacher's first ``gan_cfg.disc_blocks`` blocks (loaded, not copied from a full model).

    Args:
        teacher_transformer_path: diffusers folder of the teacher's WanTransformer3DModel.
        gan_cfg: `mogan_ds.config.GANConfig` (disc_blocks, head_blocks, head_dim, disc_timestep).
        prompt_embeds: UMT5 embedding of ``text.disc_prompt``, [1, L, text_dim] or [L, text_dim].
        dtype: parameter dtype; the backbone keeps diffusers' fp32 modules in fp32, as
            `from_pretrained` does. The heads are freshly initialised (seed the RNG first).
        gradient_checkpointing: checkpoint each backbone block (`models.gradient_checkpointing`).
    """
    backbone = load_transformer(teacher_transformer_path, dtype=dtype, num_layers=gan_cfg.disc_blocks)
    return assemble_discriminator(backbone, gan_cfg, prompt_embeds, dtype, gradient_checkpointing)


def assemble_discriminator(
    backbone, gan_cfg, prompt_embeds: torch.Tensor, dtype: torch.dtype | None, gradient_checkpointing: bool = False
) -> MotionDiscriminator:
    """D around an already built backbone (see `build_discriminator`): fresh heads, prompt buffer, checkpointing.

    ``dtype=None`` leaves the heads and the prompt embedding as created (a backbone whose
    parameters are already partitioned in their final dtype, `mogan_ds.models.partitioned`).
    """
    if gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    prompt = prompt_embeds if dtype is None else prompt_embeds.to(dtype)
    model = MotionDiscriminator(backbone, prompt, gan_cfg.head_blocks, gan_cfg.head_dim, gan_cfg.disc_timestep)
    if dtype is not None:
        model.heads.to(dtype)
        model.final.to(dtype)
    return model
