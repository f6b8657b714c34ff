"""Render mp4 samples from the few-step generator (or the teacher): the library behind
`launch/sample.py` (see its help for the command line).

`generate_samples` resolves the weights (`--generator`, `--checkpoint`, the config's
`models.generator` or, with `teacher=True`, `models.root/transformer`), encodes or loads
the prompts, samples with a per-sample CPU generator seeded by (seed, index) and writes
`<out>/NNNN_<prompt-slug>.mp4` and `<out>/samples.json`. Every input path is checked
before any network loads, so a typo costs a line, not a text-encoder load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, load_config
from ..data.video import write_mp4
from ..errors import BadFileError, UserError
from ..models.builders import (
    DTYPES,
    MissingWeightsError,
    load_text_encoder,
    load_tokenizer,
    load_transformer,
    load_vae,
    wan_paths,
)
from ..motion.latents import latent_shape
from ..parallel.attention import configure_attention
from .samplers import (
    decode_to_uint8,
    encode_prompts,
    sample_few_step,
    sample_teacher_cfg,
    transformer_velocity_fn,
)
from .schedule import FlowMatchSchedule, randn

# Where `--checkpoint DIR` may hold the generator, in this order (the trainer's export is
# `<run_dir>/export/`, a WanPipeline folder whose transformer/ is the generator).
CHECKPOINT_CANDIDATES = ("", "transformer", "generator", "export/transformer", "export/generator")


def _is_diffusers_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def resolve_generator_folder(checkpoint: str | Path) -> Path:
    """The diffusers generator folder inside a --checkpoint argument (see `CHECKPOINT_CANDIDATES`)."""
    root = Path(checkpoint)
    if not root.is_dir():
        raise MissingWeightsError(f"--checkpoint {root}: no such folder")
    candidates = [root / c if c else root for c in CHECKPOINT_CANDIDATES]
    for c in candidates:
        if _is_diffusers_folder(c):
            return c
    hint = ""
    if (root / "generator").is_dir() or (root / "COMPLETE").exists() or (root / "checkpoints").is_dir():
        hint = " (DeepSpeed training checkpoints hold ZeRO partitions: sample from the run's export/ folder)"
    tried = ", ".join(str(c) for c in candidates)
    raise MissingWeightsError(
        f"--checkpoint {root}: no diffusers-format generator (config.json + *.safetensors) at {tried}{hint}"
    )


def find_run_config(checkpoint: str | Path) -> Path | None:
    """The run's resolved config.yaml in `checkpoint` or one of its two parents."""
    p = Path(checkpoint).resolve()
    for d in [p, *list(p.parents)[:2]]:
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


def _expect_file(path: str | Path, flag: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {p}: no such file" + (" (it is a folder)" if p.is_dir() else ""))
    return p


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a text file (one per line; blank and '#' lines skipped) or a .jsonl with 'prompt'."""
    path = _expect_file(path, "--prompts")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadFileError(f"--prompts {path}: not a UTF-8 text file") from None
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadFileError(f"--prompts {path}:{n}: not a JSON record ({e})") from None
            if not isinstance(rec, dict) or "prompt" not in rec:
                raise BadFileError(f"--prompts {path}:{n}: a jsonl prompt record needs a 'prompt' field")
            prompts.append(str(rec["prompt"]))
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise BadFileError(f"--prompts {path}: no prompts")
    return prompts


def load_prompt_embeds(path: str | Path) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    """(embeds [N, L, D], N prompts, negative_embeds [1 or N, L, D] or None) of a torch file."""
    path = _expect_file(path, "--prompt-embeds")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load raises pickle, zip and runtime errors for a foreign file
        raise BadFileError(
            f"--prompt-embeds {path}: not a torch.save'd file ({' '.join(str(e).split())[:200]})"
        ) from None
    bad = f"--prompt-embeds {path}"
    if not isinstance(data, dict) or "embeds" not in data:
        raise BadFileError(f"{bad}: expected a dict with 'embeds' [N, L, D] and 'prompts' (list of N str)")
    embeds = data["embeds"]
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or not embeds.is_floating_point():
        raise BadFileError(f"{bad}: 'embeds' must be a floating [N, L, D] tensor")
    prompts = data.get("prompts") or [f"prompt {i}" for i in range(embeds.shape[0])]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise BadFileError(f"{bad}: 'prompts' must be a list of strings")
    if len(prompts) != embeds.shape[0]:
        raise BadFileError(f"{bad}: {len(prompts)} prompts for {embeds.shape[0]} embeddings")
    neg = data.get("negative_embeds")
    if neg is not None and (
        not isinstance(neg, torch.Tensor)
        or neg.ndim != 3
        or neg.shape[0] not in (1, embeds.shape[0])
        or neg.shape[2] != embeds.shape[2]
    ):
        raise BadFileError(f"{bad}: 'negative_embeds' must be [1 or N, L, D] matching 'embeds' {tuple(embeds.shape)}")
    return embeds, list(prompts), neg


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed per (run seed, prompt index): no collisions between seed s,
    prompt i+1 and seed s+1, prompt i, as a plain `seed + i` would have."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return s[:n] or "prompt"


def sampling_dtype(name: str, device: torch.device) -> torch.dtype:
    """Transformer/text-encoder dtype: 'auto' is bf16 on CUDA, fp32 elsewhere (CPU bf16 is slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def generate_samples(
    *,
    out: str | Path,
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    prompts: str | Path | None = None,
    prompt_embeds: str | Path | None = None,
    generator: str | Path | None = None,
    checkpoint: str | Path | None = None,
    teacher: bool = False,
    seed: int = 0,
    negative_prompt: str | None = None,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    vae_dtype: str = "fp32",
) -> list[dict]:
    """Sample one mp4 per prompt into `out`; returns the per-sample records of samples.json."""
    # 1. every input checked before any network loads
    if (prompts is None) == (prompt_embeds is None):
        raise UserError("give exactly one of --prompts and --prompt-embeds")
    if generator is not None and checkpoint is not None:
        raise UserError("give at most one of --generator and --checkpoint")
    if teacher and (generator is not None or checkpoint is not None):
        raise UserError("--teacher samples models.root/transformer; drop --generator/--checkpoint")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    weights = None
    if checkpoint is not None:
        weights = resolve_generator_folder(checkpoint)
    elif generator is not None:
        weights = Path(generator)
        if not weights.is_dir():
            raise MissingWeightsError(f"--generator {weights}: no such folder")
    if config is None:
        found = find_run_config(checkpoint) if checkpoint is not None else None
        if found is None:
            where = f" (no run config.yaml in {checkpoint} or its two parents)" if checkpoint is not None else ""
            raise ConfigError(f"--config is required{where}")
        config = str(found)
    cfg = load_config(config, list(overrides))
    if negative_prompt is None:  # the recipe's, as the trainer's teacher uses it
        negative_prompt = cfg.text.negative_prompt
    negative = None
    if prompt_embeds is not None:
        embeds, texts, negative = load_prompt_embeds(prompt_embeds)
    else:
        texts, embeds = read_prompt_file(prompts), None
    schedule = FlowMatchSchedule.from_config(cfg)
    device = torch.device(device)
    dt = sampling_dtype(dtype, device)
    paths = wan_paths(cfg.models.root)
    if teacher:
        weights = paths["transformer"]
    elif weights is None:
        weights = Path(cfg.models.generator) if cfg.models.generator else paths["transformer"]

    # 2. prompt embeddings (text encoder loaded only if needed, and freed before the DiT)
    need_neg = teacher and negative is None and schedule.teacher_guidance_scale != 1.0
    if embeds is None or need_neg:
        tokenizer = load_tokenizer(paths["tokenizer"])
        text_encoder = load_text_encoder(paths["text_encoder"], dt).to(device)
        if embeds is None:
            embeds = encode_prompts(texts, tokenizer, text_encoder, cfg.text.max_length)
        if need_neg:
            negative = encode_prompts([negative_prompt], tokenizer, text_encoder, embeds.shape[1])
        del text_encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 3. networks
    transformer = load_transformer(weights, dt).to(device).eval().requires_grad_(False)
    configure_attention(transformer, cfg.models.attention_backend, device)
    vae = load_vae(paths["vae"], DTYPES[vae_dtype]).to(device)
    model_fn = transformer_velocity_fn(transformer)

    # 4. sample, decode, write
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for start in range(0, len(texts), batch_size):
        idx = list(range(start, min(start + batch_size, len(texts))))
        seeds = [sample_seed(seed, i) for i in idx]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        noise = randn(latent_shape(cfg.video, len(idx)), gens, device)
        cond = embeds[idx].to(device=device, dtype=dt)
        if teacher:
            uncond = None
            if schedule.teacher_guidance_scale != 1.0:
                uncond = negative[idx] if negative.shape[0] > 1 else negative
                uncond = uncond.to(device=device, dtype=dt)
            latents = sample_teacher_cfg(model_fn, noise, cond, uncond, schedule)
        else:
            latents = sample_few_step(model_fn, noise, cond, schedule, generator=gens)
        for row, i in enumerate(idx):
            video = decode_to_uint8(vae, latents[row : row + 1])[0]
            path = out / f"{i:04d}_{slug(texts[i])}.mp4"
            write_mp4(path, video, cfg.video.fps, pad_odd=True)
            records.append(
                {
                    "index": i,
                    "prompt": texts[i],
                    "file": path.name,
                    "seed": seed,
                    "sample_seed": seeds[row],
                    "frames": int(video.shape[0]),
                    "height": int(video.shape[1]),
                    "width": int(video.shape[2]),
                }
            )
            print(f"[sample] {path}", flush=True)
    meta = {
        "sampler": "teacher_cfg" if teacher else "few_step",
        "weights": str(weights),
        "config": str(config),
        "seed": seed,
        "fps": cfg.video.fps,
        "denoising_timesteps": schedule.denoising_timesteps().tolist(),
        "teacher": {
            "steps": schedule.teacher_steps,
            "shift": schedule.teacher_shift,
            "guidance_scale": schedule.teacher_guidance_scale,
            "negative_prompt": negative_prompt,
        }
        if teacher
        else None,
        "samples": records,
    }
    (out / "samples.json").write_text(json.dumps(meta, indent=2) + "\n")
    return records
