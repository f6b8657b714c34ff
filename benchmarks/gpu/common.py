"""What every part of the GPU check shares: the mode, the part's JSON report, small helpers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"  # the entry point: the parts start its hidden modes
PART_NAMES = {"a": "a_env", "b": "b_launcher", "c": "c_paper", "d": "d_dit"}
GIB = 2**30


class Mode:
    """Everything that differs between the H200 run and the CPU smoke run: shapes, budgets, configs."""

    def __init__(self, cpu_smoke: bool):
        self.cpu_smoke = cpu_smoke
        if cpu_smoke:
            self.device = "cpu"
            self.paper_recipe, self.paper_plan = "tiny", "tiny"
            self.paper_ds = "ds_configs/zero3_cpu.json"
            self.tiny_ds = "ds_configs/zero3_cpu.json"
            self.budget = {"a": 90, "d": 120, "b": 400, "c": 300}
            self.matmul_n, self.matmul_reps = 512, (1, 3)
            self.dit_iters = 1
            self.b_steps, self.b_extra = 3, ["train.batch_size=1", "dmd.critic_updates=1"]
            self.c_rows, self.clips, self.shards = 3, 2, 1
        else:
            self.device = "cuda"
            self.paper_recipe, self.paper_plan = "wan2.1-t2v-1.3b", "wan2.1-t2v-1.3b"
            self.paper_ds = "ds_configs/zero3_bf16.json"
            self.tiny_ds = "ds_configs/zero3_bf16.json"
            # b: 196 s on the first H200 run (tiny workdir 68 s, the run 63 s, the resume ~55 s), past its first 170
            self.budget = {"a": 40, "d": 70, "b": 240, "c": 420}
            self.matmul_n, self.matmul_reps = 8192, (20, 50)
            self.dit_iters = 2
            # deterministic kernels: the first H200 resume differed by 5% relative from the uninterrupted
            # run (benchmarks/results/2026-12-04_h200_2); with them, kernel noise cannot explain a difference
            self.b_steps, self.b_extra = 4, ["train.deterministic=true"]
            self.c_rows, self.clips, self.shards = 4, 8, 4


class Report:
    """One part's JSON file, rewritten atomically at every update: a kill loses nothing written before."""

    def __init__(self, out: Path, part: str):
        self.path = out / f"{PART_NAMES[part]}.json"
        self.data = {"check": PART_NAMES[part], "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.t0 = time.monotonic()
        self.write()

    def update(self, **kw) -> None:
        self.data.update(kw)
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def file_tail(path: Path, n: int = 3000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - n))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def kill_group(pgid: int, grace: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM a process group (DeepSpeed's launcher passes it on to its ranks), then SIGKILL what is left.

    `proc`, the group's leader when it is our child, is reaped meanwhile (a zombie still counts as a member).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if proc is not None:
            proc.poll()
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def to_gib(v):
    return None if v is None else round(v / GIB, 2)


def round_sig(v, sig=4):
    """`v` to `sig` significant digits (tiny CPU figures keep theirs), None when missing or not finite."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return float(f"{v:.{sig}g}")


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
