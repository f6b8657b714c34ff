"""Metrics: a JSONL file (always), wandb (offline unless configured; never required), tqdm.

Only rank 0 writes. Every logged row is one JSON object per iteration with the step and
all scalars of that iteration (losses, logits, R1/R2, DMD gradient norm, learning rates,
per-phase times, samples/s, peak memory).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..metric_names import PROGRESS_BAR

log = logging.getLogger("mogan_ds")


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory of this process, or peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        cfg_dict: dict,
        enabled: bool,
        total_steps: int,
        start_step: int,
        wandb_mode: str = "offline",
        wandb_project: str = "mogan_ds",
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._fh = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, start_step)
        self._fh = open(self.path, "a", buffering=1)
        if wandb_mode != "disabled":
            self._wandb = _start_wandb(run_dir, cfg_dict, wandb_mode, wandb_project)
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="mogan",
            dynamic_ncols=True,
            disable=not sys.stderr.isatty() and os.environ.get("MOGAN_PROGRESS") != "1",
        )

    def log(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in scalars.items()}}
        self._fh.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            keys = [k for k in PROGRESS_BAR if k in row]
            self._bar.set_postfix({k: f"{row[k]:.3g}" for k in keys})

    def log_video(self, step: int, name: str, path: Path) -> None:
        if self.enabled and self._wandb is not None:
            import wandb  # lazy, as in _start_wandb: only reached when wandb is running

            self._wandb.log({name: wandb.Video(str(path), format="mp4")}, step=step)

    def close(self) -> None:
        if self._fh:
            self._fh.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    """Drop rows past `step`: a resumed run re-logs the steps after its checkpoint."""
    if not path.is_file():
        return
    with open(path) as fh:
        rows = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(rows))
    os.replace(tmp, path)


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact visible
    return v


def _start_wandb(run_dir, cfg_dict, mode, project):
    try:
        # Lazy: wandb is optional at run time (logging.wandb_mode=disabled) and its import is
        # slow and can fail on a broken install, which must never stop training.
        import wandb

        return wandb.init(
            project=project, dir=str(run_dir), config=cfg_dict, mode=mode, name=Path(run_dir).name, resume="allow"
        )
    except Exception as e:  # wandb is a convenience: a broken install or login never stops training
        log.warning("wandb disabled: %s", e)
        return None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of a run's metrics.jsonl (used by tests and tools)."""
    with open(Path(run_dir) / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]
