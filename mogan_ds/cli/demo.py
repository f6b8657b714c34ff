"""The embedded tiny default: the whole pipeline end to end on CPU, through the real launcher.

1. tiny random-initialised models of the real architectures (data_tools/make_tiny_models.py)
2. a synthetic moving-shapes corpus as webdataset shards (data_tools/make_synthetic.py)
3. prompt embeddings with the tiny UMT5 encoder (data_tools/encode_prompts.py)
4. `deepspeed --num_gpus N launch/train.py --ds_config ... --config tiny`: all four phases,
   checkpoints, samples, metrics and the diffusers export under the run directory.

Steps 1-3 are skipped when their outputs exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..config import load_config
from ..models.tiny import write_tiny_models
from .launcher import REPO, deepspeed_command, launch_env


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=launch_env())


def prepare_tiny_workdir(workdir: str | Path, clips: int = 32, frames: int = 24) -> dict[str, Path]:
    """Tiny models, synthetic shards and prompt embeddings under `workdir` (idempotent)."""
    w = Path(workdir).resolve()
    models = write_tiny_models(w / "models")
    shards, prompts_txt, prompts = w / "shards", w / "prompts.txt", w / "prompts"
    if not (shards / ".complete").exists():
        _run(
            [
                sys.executable,
                "data_tools/make_synthetic.py",
                "--out",
                str(shards),
                "--num-clips",
                str(clips),
                "--frames",
                str(frames),
                "--size",
                "160x160",
                "--fps",
                "8",
                "--shards",
                "4",
                "--prompts",
                str(prompts_txt),
                "--overwrite",
            ]
        )
        (shards / ".complete").write_text("ok\n")
    if not (prompts / ".complete").exists():
        _run(
            [
                sys.executable,
                "data_tools/encode_prompts.py",
                "--prompts",
                str(prompts_txt),
                "--text-encoder",
                str(models / "wan" / "text_encoder"),
                "--tokenizer",
                str(models / "wan" / "tokenizer"),
                "--max-length",
                "32",
                "--out",
                str(prompts),
            ]
        )
        (prompts / ".complete").write_text("ok\n")
    return {"models": models, "shards": shards, "prompts": prompts}


def tiny_overrides(paths: dict[str, Path]) -> list[str]:
    m = paths["models"]
    return [
        f"models.root={m / 'wan'}",
        f"models.generator={m / 'generator'}",
        f"models.raft={m / 'raft_small.pth'}",
        f"data.shards={paths['shards']}",
        f"data.prompts={paths['prompts']}",
    ]


def run_demo(workdir: str, num_ranks: int, ds_config: str, overrides: list[str]) -> int:
    paths = prepare_tiny_workdir(workdir)
    args = ["--ds_config", ds_config, "--config", "tiny", *tiny_overrides(paths), *overrides]
    _run(deepspeed_command(num_ranks, "launch/train.py", args))
    run_dir = REPO / load_config("tiny", overrides).output.run_dir
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    last = rows[-1]
    print(f"\ndemo finished: {len(rows)} logged steps in {run_dir}")
    print(
        "last step:",
        {k: round(v, 4) if isinstance(v, float) else v for k, v in last.items() if "loss" in k or k == "step"},
    )
    print("checkpoints:", sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")))
    print("samples:", sorted(p.name for p in (run_dir / "samples").glob("*.mp4")))
    print("export (WanPipeline.from_pretrained):", run_dir / "export")
    return 0
