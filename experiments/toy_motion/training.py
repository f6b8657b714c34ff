"""The training loop of stages 2-4 (RAFT, VAE, teacher): seeding, schedules, resumable steps."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np
import torch


def pick_device(name: str | None = None) -> torch.device:
    """The device the stages run on: `name` ("cpu", "cuda", "cuda:1"), or for None / "auto" the
    accelerator when one is present, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: no CUDA device here")
    return dev


def autocast(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on CUDA for the forward passes where it is safe (the VAE's and the
    teacher's training forwards); on the CPU, or with `enabled` False, nothing (fp32), so the
    CPU path is the one it always was. Losses are taken in fp32 either way."""
    dev = torch.device(device)
    if enabled and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_all(seed: int) -> torch.Generator:
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def warmup_cosine(opt: torch.optim.Optimizer, r: dict) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over r["warmup_steps"], then a cosine from r["lr"] down to r["lr_floor"] x lr at the last step."""
    warm, steps, floor = max(1, r["warmup_steps"]), r["steps"], r["lr_floor"]

    def factor(i: int) -> float:
        cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, i / max(1, steps))))
        return min((i + 1) / warm, floor + (1.0 - floor) * cos)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(
    ckpt: Path,
    r: dict,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator,
    step_fn,
    label: str,
    echo=print,
) -> list[dict]:
    """The training loop of stages 2-4: steps up to r["steps"], resumable.

    `step_fn(step)` draws its batch from `gen` and returns (loss, {name: float}) for the curve;
    the update is AdamW-style: zero grad, backward, clip to r["grad_clip"], step, schedule step.
    Every r["checkpoint_every"] steps (and at the last) the model, optimiser, schedule, curve and
    generator state go to `ckpt` atomically; a restart continues from there, drawing the same batches.
    With r["time_limit_s"] (the gpu scale's, sized to one device command), the loop stops after
    the first step past that many seconds of this call, checkpointed; the curve's last step says
    where (the schedule was set for r["steps"] and did not finish its decay).
    Returns the curve, one {"step", **values} per step.
    """
    import time

    t0, limit = time.time(), r.get("time_limit_s")
    start, curve = 0, []
    if ckpt.is_file():
        st = torch.load(ckpt, map_location="cpu", weights_only=False)  # load_state_dict moves to the model's device
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start, curve = st["step"], st["curve"]
        gen.set_state(st["rng"])
    for step in range(start, r["steps"]):
        loss, values = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        sched.step()
        curve.append({"step": step + 1, **values})
        over = limit is not None and time.time() - t0 > limit
        if (step + 1) % r["checkpoint_every"] == 0 or step + 1 == r["steps"] or over:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
            atomic_save({**state, "step": step + 1, "curve": curve, "rng": gen.get_state()}, ckpt)
            recent = {k: np.mean([c[k] for c in curve[-50:]]) for k in values}
            echo(
                f"[toy] {label} step {step + 1}/{r['steps']} (mean of last 50): "
                + ", ".join(f"{k} {v:.4f}" for k, v in recent.items())
            )
        if over:
            echo(f"[toy] {label}: time limit {limit} s reached at step {step + 1} of {r['steps']}; stopping there")
            break
    return curve
