#!/usr/bin/env python
"""Render mp4 samples from the few-step generator (or the teacher), deterministic for a seed.

    python launch/sample.py --config <recipe> [--generator DIR | --checkpoint DIR] \\
        (--prompts FILE | --prompt-embeds FILE.pt) --out DIR [--seed 0] [--teacher] [key=value ...]

Weights (all local diffusers-format folders, nothing is downloaded):
  --generator DIR     a `WanTransformer3DModel` folder (config.json + *.safetensors).
  --checkpoint DIR    a training run's exported generator in that format, the first of
                      DIR, DIR/transformer, DIR/generator, DIR/export/transformer,
                      DIR/export/generator that holds one. The trainer's export
                      (mogan_ds/export.py) is `<run_dir>/export/`, a WanPipeline folder
                      whose transformer/ is the generator, so `--checkpoint <run_dir>` works.
                      DeepSpeed engine checkpoints (`<run_dir>/checkpoints/step_N/`) hold
                      ZeRO partitions, not a diffusers folder: export them first.
  neither             models.generator of the config (models.root/transformer if empty).
  --teacher           models.root/transformer with the teacher's multi-step CFG sampler
                      (schedule.teacher_steps / teacher_shift / teacher_guidance_scale).
  VAE, text encoder and tokenizer always come from models.root.

Config: --config (recipe or shipped name) + key=value overrides. With --checkpoint and no
--config, the run's resolved `config.yaml` is looked up in DIR and its two parents.

Prompts:
  --prompts FILE      one prompt per line (blank lines and '#' lines skipped), or .jsonl
                      with {"prompt": ...}; encoded with models.root's UMT5 exactly as
                      WanPipeline does, text.max_length tokens.
  --prompt-embeds F   torch.save'd dict {"embeds": [N, L, D], "prompts": [N str]}, optionally
                      "negative_embeds": [1 or N, L, D] (the teacher's unconditional input;
                      without it the text encoder is loaded to encode --negative-prompt).

Output: DIR/NNNN_<prompt-slug>.mp4 (libx264, video.fps) and DIR/samples.json.
Determinism: sample i draws its initial and re-noising noise from a CPU generator seeded
with hash(--seed, i), so a seed gives the same noise on any device and any --batch-size;
the same seed on the same machine gives identical frames.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

try:
    import mogan_ds  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from mogan_ds.config import ConfigError, load_config
from mogan_ds.models.builders import DTYPES, MissingWeightsError, load_text_encoder, load_tokenizer, load_transformer, load_vae, wan_paths
from mogan_ds.sampling import decode_to_uint8, encode_prompts, latent_shape, sample_few_step, sample_teacher_cfg, transformer_velocity_fn
from mogan_ds.schedule import FlowMatchSchedule, randn
from mogan_ds.video_io import write_mp4


def _is_diffusers_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def resolve_generator_folder(checkpoint: str | Path) -> Path:
    """The diffusers generator folder inside a --checkpoint argument (see the module doc)."""
    root = Path(checkpoint)
    candidates = [root, root / "transformer", root / "generator", root / "export" / "transformer", root / "export" / "generator"]
    for c in candidates:
        if _is_diffusers_folder(c):
            return c
    hint = ""
    if (root / "generator").is_dir() or (root / "COMPLETE").exists() or (root / "checkpoints").is_dir():
        hint = " (DeepSpeed training checkpoints hold ZeRO partitions: sample from the run's export/ folder)"
    tried = ", ".join(str(c) for c in candidates)
    raise MissingWeightsError(f"--checkpoint {root}: no diffusers-format generator (config.json + *.safetensors) at {tried}{hint}")


def _find_run_config(checkpoint: str | Path) -> Path | None:
    p = Path(checkpoint).resolve()
    for d in [p, *list(p.parents)[:2]]:
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


def read_prompt_file(path: str | Path) -> list[str]:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rec = json.loads(line)
                if "prompt" not in rec:
                    raise ValueError(f"{path}:{n}: a jsonl prompt record needs a 'prompt' field")
                prompts.append(str(rec["prompt"]))
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def load_prompt_embeds(path: str | Path) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "embeds" not in data:
        raise ValueError(f"{path}: expected a dict with 'embeds' [N, L, D] and 'prompts' (list of N str)")
    embeds = data["embeds"]
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
        raise ValueError(f"{path}: 'embeds' must be a [N, L, D] tensor")
    prompts = list(data.get("prompts") or [f"prompt {i}" for i in range(embeds.shape[0])])
    if len(prompts) != embeds.shape[0]:
        raise ValueError(f"{path}: {len(prompts)} prompts for {embeds.shape[0]} embeddings")
    neg = data.get("negative_embeds")
    if neg is not None and (neg.ndim != 3 or neg.shape[0] not in (1, embeds.shape[0]) or neg.shape[2] != embeds.shape[2]):
        raise ValueError(f"{path}: 'negative_embeds' must be [1 or N, L, D] matching 'embeds' {tuple(embeds.shape)}")
    return embeds, prompts, neg


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed per (run seed, prompt index): no collisions between seed s,
    prompt i+1 and seed s+1, prompt i, as a plain `seed + i` would have."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return s[:n] or "prompt"


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--generator", help="diffusers WanTransformer3DModel folder of the few-step generator")
    src.add_argument("--checkpoint", help="run dir or export dir holding the generator in diffusers format (see above)")
    ap.add_argument("--config", help="recipe YAML or shipped recipe name (default: the run's config.yaml with --checkpoint)")
    pr = ap.add_mutually_exclusive_group(required=True)
    pr.add_argument("--prompts", help="text file, one prompt per line (or .jsonl with 'prompt')")
    pr.add_argument("--prompt-embeds", dest="prompt_embeds", help="torch file {'embeds': [N,L,D], 'prompts': [...]}")
    ap.add_argument("--out", required=True, help="output directory for the mp4 files and samples.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", action="store_true", help="sample the teacher (models.root/transformer) with multi-step CFG")
    ap.add_argument("--negative-prompt", dest="negative_prompt", default="", help="teacher's unconditional prompt (WanPipeline default: empty)")
    ap.add_argument("--batch-size", dest="batch_size", type=int, default=1, help="prompts per network call")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="transformer/text encoder dtype (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--vae-dtype", dest="vae_dtype", choices=["bf16", "fp32"], default="fp32")
    ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return ap


def run(args: argparse.Namespace) -> list[dict]:
    if args.config is None:
        found = _find_run_config(args.checkpoint) if args.checkpoint else None
        if found is None:
            raise ConfigError("--config is required (no run config.yaml found next to --checkpoint)")
        args.config = str(found)
    cfg = load_config(args.config, args.overrides)
    schedule = FlowMatchSchedule.from_config(cfg)
    device = torch.device(args.device)
    dtype = _dtype(args.dtype, device)
    paths = wan_paths(cfg.models.root)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.teacher and (args.generator or args.checkpoint):
        raise ValueError("--teacher samples models.root/transformer; drop --generator/--checkpoint")

    # 1. prompt embeddings (text encoder loaded only if needed, and freed before the DiT)
    negative = None
    if args.prompt_embeds:
        embeds, prompts, negative = load_prompt_embeds(args.prompt_embeds)
    else:
        prompts = read_prompt_file(args.prompts)
        embeds = None
    need_neg = args.teacher and negative is None and schedule.teacher_guidance_scale != 1.0
    if embeds is None or need_neg:
        tokenizer = load_tokenizer(paths["tokenizer"])
        text_encoder = load_text_encoder(paths["text_encoder"], dtype).to(device)
        if embeds is None:
            embeds = encode_prompts(prompts, tokenizer, text_encoder, cfg.text.max_length)
        if need_neg:
            negative = encode_prompts([args.negative_prompt], tokenizer, text_encoder, embeds.shape[1])
        del text_encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 2. networks
    if args.teacher:
        weights = paths["transformer"]
    elif args.generator:
        weights = Path(args.generator)
    elif args.checkpoint:
        weights = resolve_generator_folder(args.checkpoint)
    else:
        weights = Path(cfg.models.generator) if cfg.models.generator else paths["transformer"]
    transformer = load_transformer(weights, dtype).to(device).eval().requires_grad_(False)
    backend = cfg.models.attention_backend
    if backend == "flash" or (backend == "auto" and device.type == "cuda" and _has_flash_attn()):
        transformer.set_attention_backend("flash")
    vae = load_vae(paths["vae"], DTYPES[args.vae_dtype]).to(device)
    model_fn = transformer_velocity_fn(transformer)

    # 3. sample, decode, write
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for start in range(0, len(prompts), args.batch_size):
        idx = list(range(start, min(start + args.batch_size, len(prompts))))
        seeds = [sample_seed(args.seed, i) for i in idx]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        noise = randn(latent_shape(cfg.video, len(idx)), gens, device)
        cond = embeds[idx].to(device=device, dtype=dtype)
        if args.teacher:
            uncond = None
            if schedule.teacher_guidance_scale != 1.0:
                uncond = negative[idx] if negative.shape[0] > 1 else negative
                uncond = uncond.to(device=device, dtype=dtype)
            latents = sample_teacher_cfg(model_fn, noise, cond, uncond, schedule)
        else:
            latents = sample_few_step(model_fn, noise, cond, schedule, generator=gens)
        for row, i in enumerate(idx):
            video = decode_to_uint8(vae, latents[row : row + 1])[0]
            path = out / f"{i:04d}_{slug(prompts[i])}.mp4"
            write_mp4(path, video, cfg.video.fps)
            records.append({"index": i, "prompt": prompts[i], "file": path.name, "seed": args.seed, "sample_seed": seeds[row], "frames": int(video.shape[0]), "height": int(video.shape[1]), "width": int(video.shape[2])})
            print(f"[sample] {path}", flush=True)
    meta = {
        "sampler": "teacher_cfg" if args.teacher else "few_step",
        "weights": str(weights),
        "config": str(args.config),
        "seed": args.seed,
        "fps": cfg.video.fps,
        "denoising_timesteps": schedule.denoising_timesteps().tolist(),
        "teacher": {"steps": schedule.teacher_steps, "shift": schedule.teacher_shift, "guidance_scale": schedule.teacher_guidance_scale, "negative_prompt": args.negative_prompt} if args.teacher else None,
        "samples": records,
    }
    (out / "samples.json").write_text(json.dumps(meta, indent=2) + "\n")
    return records


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ConfigError, MissingWeightsError, ValueError) as e:
        print(f"sample: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
