"""Part c's inputs: random networks and prompt embeddings at the real shapes, through the real save path."""

from __future__ import annotations

import json
from pathlib import Path


def write_random_models(out: Path, arch: str, raft_arch: str) -> dict:
    """Full-size (or tiny) random networks through the real save path: the folders a run loads.

    <out>/wan/transformer (WanTransformer3DModel.save_pretrained, bf16: half the bytes to write and
    read; loading casts as for an fp32 file), <out>/wan/vae (AutoencoderKLWan, fp32), <out>/<raft>.pth.
    No text encoder: the trainer reads prompt embeddings, and the architecture comes from the preset.
    Built on the CPU (~15 s at 1.3B): this process holds no CUDA context while the trainer runs.
    """
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from mogan_ds.models.builders import build_raft
    from mogan_ds.models.presets import PRESETS

    preset, sizes = PRESETS[arch], {}
    torch.manual_seed(0)
    net = WanTransformer3DModel(**preset["transformer"])
    sizes["transformer_params"] = sum(p.numel() for p in net.parameters())
    net.to(torch.bfloat16).save_pretrained(out / "wan" / "transformer")
    del net
    vae = AutoencoderKLWan(**preset["vae"])
    sizes["vae_params"] = sum(p.numel() for p in vae.parameters())
    vae.save_pretrained(out / "wan" / "vae")
    del vae
    torch.save(build_raft(raft_arch).state_dict(), out / f"{raft_arch}.pth")
    sizes["bytes_written"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return sizes


def write_random_prompts(
    out: Path, num: int, max_length: int, dim: int, negative_prompt: str, disc_prompt: str, seed: int = 0
) -> dict:
    """A prompt-embedding folder (mogan_ds/data/prompts.py's layout) of random N(0, 1) embeddings.

    Each prompt's true length is drawn in [max_length/8, max_length/2] (Wan's prompts are tens to
    a few hundred tokens); the loader pads to max_length, so the DiT computes on [max_length, dim]
    whatever the length.
    """
    import io

    import numpy as np

    from mogan_ds.data.shard_build import write_tar_atomic

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)

    def emb():
        n = int(rng.integers(max(1, max_length // 8), max(2, max_length // 2) + 1))
        return rng.standard_normal((n, dim), dtype=np.float32)

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

    special = io.BytesIO()
    np.savez(special, negative=emb(), disc=emb())
    (out / "special.npz").write_bytes(special.getvalue())
    samples = [{"__key__": f"{i:08d}", "npy": npy(emb()), "txt": f"random prompt {i}".encode()} for i in range(num)]
    write_tar_atomic(str(out / "prompts-000000.tar"), samples)
    meta = {
        "num_prompts": num,
        "max_length": max_length,
        "dim": dim,
        "shards": ["prompts-000000.tar"],
        "special": "special.npz",
        "negative_prompt": negative_prompt,
        "disc_prompt": disc_prompt,
        "truncated_prompts": 0,
        "identity": {"random": True, "seed": seed},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta
