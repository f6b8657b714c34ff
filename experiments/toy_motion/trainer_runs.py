"""Runs of the trainer (stages 5 and 6): launch/train.py on a stage's recipe, pointed at the work
folder, resumed when the run has checkpoints; and what a finished run's metrics report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .workdir import HERE, RECIPES, REPO, WorkFolder

DS_CPU = REPO / "ds_configs" / "zero3_cpu.json"


def exported(run: Path) -> Path:
    """Where a trainer run exports its generator (a diffusers transformer folder)."""
    return run / "export" / "transformer"


def run_dirs(wf: WorkFolder) -> dict[str, Path]:
    """The trainer runs by row name: stage 5's ("dmd") and stage 6's rows, in that order."""
    return {"dmd": wf.work / "dmd" / "run", **{n: wf.work / "mogan" / n for n in wf.recipes["mogan"]["rows"]}}


def train(wf: WorkFolder, stage: str, run: Path, extra: list[str], echo=print) -> Path:
    """One trainer run through launch/train.py (world of one), resumed when it has checkpoints.
    Returns the run's exported transformer folder."""
    from mogan_ds.cli.launcher import launch_env

    r = wf.recipes[stage]
    args = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "--ds_config",
        str(DS_CPU),
        "--config",
        str(HERE / RECIPES[stage]),
        *wf.paths_overrides(),
        f"output.run_dir={run}",
        *extra,
        *r.get("overrides", []),
    ]
    if any((run / "checkpoints").glob("step_*/COMPLETE")):
        args.append("--resume")
    echo("+ " + " ".join(args))
    # DeepSpeed JIT-builds its CPU comm op at start-up under a file lock in the extensions
    # folder; in a folder of this checkout's own, other virtualenvs sharing ~/.cache cannot
    # make the launch wait on (or redo) their builds. Built once, then reused.
    ext = os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".cache" / "torch_extensions")
    extra_env = {"OMP_NUM_THREADS": str(min(2, os.cpu_count() or 1)), "TORCH_EXTENSIONS_DIR": ext}
    # The trainer takes DeepSpeed's accelerator (CUDA when present); the work folder's device
    # decides it: --device cpu on a CUDA machine hides the GPUs from the run. The DeepSpeed
    # config is the same (no bf16 section, the recipes' frozen_dtype fp32): stages 5-6 run in
    # fp32 on either device.
    if wf.device.type == "cpu":
        extra_env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    else:
        extra_env["DS_ACCELERATOR"] = "cuda"
        if wf.device.index is not None:
            extra_env["CUDA_VISIBLE_DEVICES"] = str(wf.device.index)
    env = launch_env(extra_env)
    with open(run.parent / f"{run.name}.console.log", "a") as log:
        proc = subprocess.run(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(
            f"trainer run {run} failed (exit {proc.returncode}); see {run.parent / run.name}.console.log"
        )
    export = exported(run)
    if not (export / "config.json").is_file():
        raise RuntimeError(f"trainer run {run} left no export at {export}")
    return export


def run_summary(run: Path) -> dict:
    """The last logged step of a run: its step and losses (those it logged)."""
    from mogan_ds.train.metrics import read_metrics

    rows = read_metrics(run)
    last = rows[-1]
    keep = ("dmd_loss", "fake_score_loss", "g_gan_loss", "d_loss", "d_accuracy", "eval_dynamics_degree")
    return {"steps": last["step"], **{k: round(float(last[k]), 4) for k in keep if k in last}}
