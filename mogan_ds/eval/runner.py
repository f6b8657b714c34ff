"""Offline evaluation: generators x prompts x seeds -> cached mp4s -> per-video metrics -> results table.

The library behind `launch/evaluate.py`. Layout of `out`:

    videos/<model>/seed<S>/<NNNN>_<prompt-slug>.mp4   sampled once; an existing file is reused
    videos/<model>/model.json                          which weights the model's videos came from
    metrics.jsonl (metrics.rank<R>.jsonl per rank)     one record per video; reused when its
                                                       metric weights are unchanged
    results.json, results.md, results.png              one row per model (rank 0)

Video i of seed S is what `launch/sample.py --seed S` renders for prompt i (noise seeded
by `generate.sample_seed(S, i)`), so every model sees the same initial noise. Under the
deepspeed launcher each rank takes every world-th (model, prompt, seed) job, samples and
scores it, and rank 0 gathers the per-rank records after a barrier.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ConfigError, load_config
from ..data.video import read_mp4, write_mp4
from ..errors import UserError
from ..models.builders import DTYPES, load_text_encoder, load_tokenizer, load_transformer, load_vae, wan_paths
from ..motion.latents import latent_shape
from ..parallel.attention import configure_attention
from ..parallel.ranks import barrier, dist_ready, process_rank, world_size
from ..sampling.generate import (
    find_run_config,
    read_prompt_file,
    resolve_generator_folder,
    sample_seed,
    sampling_dtype,
    slug,
)
from ..sampling.samplers import (
    decode_to_uint8,
    encode_prompts,
    sample_few_step,
    sample_teacher_cfg,
    transformer_velocity_fn,
)
from ..sampling.schedule import FlowMatchSchedule, randn
from .metrics import EvalWeights, VideoMetrics, summarize
from .report import bar_chart, results_markdown, summary_line


@dataclass
class ModelSpec:
    """A generator to evaluate: a diffusers folder or run directory, or the teacher (multi-step CFG)."""

    name: str
    path: str | None = None
    teacher: bool = False


def parse_model(arg: str) -> ModelSpec:
    """``NAME=PATH`` or ``PATH`` (named after the folder)."""
    name, sep, path = arg.partition("=")
    if not sep:
        path, name = arg, Path(arg.rstrip("/")).name or "model"
    if not name or not path:
        raise UserError(f"--model {arg!r}: expected NAME=PATH or PATH")
    return ModelSpec(name=name, path=path)


@dataclass
class Job:
    model: ModelSpec
    prompt_index: int
    seed: int
    path: Path


def _check_models(models: list[ModelSpec]) -> None:
    if not models:
        raise UserError("nothing to evaluate: give --model NAME=PATH and/or --teacher")
    names = [m.name for m in models]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UserError(f"model names must be unique, repeated: {', '.join(sorted(dup))}")
    for m in models:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", m.name) or m.name in (".", ".."):
            raise UserError(f"model name {m.name!r}: use letters, digits, '-', '_' or '.' (it names a folder)")


def _record_model(folder: Path, weights: Path, teacher: bool, teacher_steps: int) -> None:
    """Refuse to mix videos of two different generators under one model name."""
    meta = {"weights": str(weights.resolve()), "teacher": teacher, "teacher_steps": teacher_steps if teacher else None}
    f = folder / "model.json"
    if f.is_file():
        old = json.loads(f.read_text())
        if old != meta:
            raise UserError(
                f"{folder}: its videos came from {old}, not {meta}; use another model name or --out, or delete the folder"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(meta, indent=2) + "\n")


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interrupted write: that video is scored again
            continue
    return out


class _Sampler:
    """Loads the text encoder once, the VAE once and one generator at a time, only when a video is missing."""

    def __init__(self, cfg, texts: list[str], device: torch.device, dtype: str, vae_dtype: str, need_negative: bool):
        self.cfg, self.texts, self.device = cfg, texts, device
        self.dt = sampling_dtype(dtype, device)
        self.vae_dt = DTYPES[vae_dtype]
        self.paths = wan_paths(cfg.models.root)
        self.schedule = FlowMatchSchedule.from_config(cfg)
        self.need_negative = need_negative
        self.embeds = self.negative = self.vae = None
        self.model_name, self.model_fn = None, None

    def _prepare(self) -> None:
        if self.embeds is not None:
            return
        tokenizer = load_tokenizer(self.paths["tokenizer"])
        encoder = load_text_encoder(self.paths["text_encoder"], self.dt).to(self.device)
        self.embeds = encode_prompts(self.texts, tokenizer, encoder, self.cfg.text.max_length)
        if self.need_negative:
            self.negative = encode_prompts([self.cfg.text.negative_prompt], tokenizer, encoder, self.embeds.shape[1])
        del encoder
        self.vae = load_vae(self.paths["vae"], self.vae_dt).to(self.device)

    def _load(self, spec: ModelSpec, weights: Path) -> None:
        if self.model_name == spec.name:
            return
        self.model_fn = None  # free the previous generator first
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        transformer = load_transformer(weights, self.dt).to(self.device).eval().requires_grad_(False)
        configure_attention(transformer, self.cfg.models.attention_backend, self.device)
        self.model_fn, self.model_name = transformer_velocity_fn(transformer), spec.name

    @torch.no_grad()
    def render(self, job: Job, weights: Path) -> None:
        self._prepare()
        self._load(job.model, weights)
        seed = sample_seed(job.seed, job.prompt_index)
        gen = torch.Generator("cpu").manual_seed(seed)
        noise = randn(latent_shape(self.cfg.video, 1), [gen], self.device)
        cond = self.embeds[job.prompt_index : job.prompt_index + 1].to(self.device, self.dt)
        if job.model.teacher:
            uncond = None
            if self.schedule.teacher_guidance_scale != 1.0:
                uncond = self.negative.to(self.device, self.dt)
            latents = sample_teacher_cfg(self.model_fn, noise, cond, uncond, self.schedule)
        else:
            latents = sample_few_step(self.model_fn, noise, cond, self.schedule, generator=[gen])
        video = decode_to_uint8(self.vae, latents)[0]
        write_mp4(job.path, video, self.cfg.video.fps, pad_odd=True)


def evaluate(
    *,
    out: str | Path,
    models: list[ModelSpec],
    prompts: str | Path,
    seeds: list[int] = (0,),
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    weights: EvalWeights | None = None,
    teacher_steps: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    vae_dtype: str = "fp32",
    metrics: VideoMetrics | None = None,
    progress: bool = True,
) -> list[dict] | None:
    """Sample what is missing, score what is unscored, write the table; returns the rows (None on ranks > 0)."""
    # 1. inputs checked before any network loads
    models = list(models)
    _check_models(models)
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must be distinct integers, got {seeds}")
    texts = read_prompt_file(prompts)
    folders: dict[str, Path] = {}
    for m in models:
        if not m.teacher:
            folders[m.name] = resolve_generator_folder(m.path)
    if config is None:
        runs = [m.path for m in models if not m.teacher]
        found = find_run_config(runs[0]) if runs else None
        if found is None:
            raise ConfigError("--config is required (no run config.yaml next to the first --model)")
        config = str(found)
    overrides = list(overrides)
    if teacher_steps is not None:
        overrides.append(f"schedule.teacher_steps={teacher_steps}")
    cfg = load_config(config, overrides)
    for m in models:
        if m.teacher:
            folders[m.name] = wan_paths(cfg.models.root)["transformer"]
    out = Path(out)
    rank, world = process_rank(), world_size()
    device = torch.device(device)

    # 2. jobs: (model, prompt, seed), split across ranks
    jobs = [
        Job(m, i, s, out / "videos" / m.name / f"seed{s}" / f"{i:04d}_{slug(texts[i])}.mp4")
        for m in models
        for s in seeds
        for i in range(len(texts))
    ]
    mine = jobs[rank::world]
    if rank == 0:
        for m in models:
            _record_model(out / "videos" / m.name, folders[m.name], m.teacher, cfg.schedule.teacher_steps)
    barrier()

    # 3. metrics (weights hashed once; absent ones announced and left n/a)
    log = print if rank == 0 else (lambda _msg: None)
    metrics = metrics or VideoMetrics.from_weights(weights or EvalWeights(), device, log=log)
    rec_file = out / ("metrics.jsonl" if world == 1 else f"metrics.rank{rank}.jsonl")
    done = {(r["model"], r["file"]): r for r in _read_records(rec_file) if r.get("metric_weights") == metrics.weights}
    need_negative = any(m.teacher for m in models) and FlowMatchSchedule.from_config(cfg).teacher_guidance_scale != 1.0
    sampler = _Sampler(cfg, texts, device, dtype, vae_dtype, need_negative)
    records: list[dict] = []
    sampled = reused = 0
    with open(rec_file, "a") as sink:
        for job in tqdm(mine, desc="videos", unit="video", disable=not progress or rank != 0):
            rel = str(job.path.relative_to(out))
            if job.path.is_file():
                reused += 1
            else:
                job.path.parent.mkdir(parents=True, exist_ok=True)
                sampler.render(job, folders[job.model.name])
                sampled += 1
            key = (job.model.name, rel)
            if key in done:
                records.append(done[key])
                continue
            frames, fps = read_mp4(job.path)
            rec = {
                "model": job.model.name,
                "file": rel,
                "prompt_index": job.prompt_index,
                "prompt": texts[job.prompt_index],
                "seed": job.seed,
                "sample_seed": sample_seed(job.seed, job.prompt_index),
                "frames": int(frames.shape[0]),
                "fps": fps,
                **metrics.video(frames, fps),
                "metric_weights": metrics.weights,
            }
            sink.write(json.dumps(rec) + "\n")
            sink.flush()
            records.append(rec)
    print(f"[eval] rank {rank}: {sampled} videos sampled, {reused} reused, {len(mine)} scored", flush=True)

    # 4. gather and write the table on rank 0
    barrier()
    if rank != 0:
        return None
    if world > 1:
        records = []
        for r in range(world):
            part = {(x["model"], x["file"]): x for x in _read_records(out / f"metrics.rank{r}.jsonl")}
            records += [part[k] for k in part if part[k].get("metric_weights") == metrics.weights]
        wanted = {(j.model.name, str(j.path.relative_to(out))) for j in jobs}
        records = [x for x in records if (x["model"], x["file"]) in wanted]
    rows = [summarize(m.name, [x for x in records if x["model"] == m.name], metrics.weights) for m in models]
    for row, m in zip(rows, models):
        row["generator"] = str(folders[m.name])
        row["sampler"] = f"teacher CFG, {cfg.schedule.teacher_steps} steps" if m.teacher else "few-step"
        row["seeds"] = seeds
        row["prompts"] = str(prompts)
        row["num_prompts"] = len(texts)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(rows, f"Evaluation: {Path(prompts).name}, seeds {seeds}"))
    bar_chart(rows, out / "results.png")
    print(summary_line(rows), flush=True)  # n/a columns were announced once, when the metrics loaded
    return rows


def init_distributed_from_env() -> None:
    """Join the deepspeed launcher's process group (env RANK/WORLD_SIZE); a no-op in one process."""
    if dist_ready() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend)
