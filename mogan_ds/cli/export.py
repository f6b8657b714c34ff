"""`python -m mogan_ds export`: any complete checkpoint of a run -> a WanPipeline folder, offline.

    python -m mogan_ds export --run-dir runs/x [--step N] [--ema] [--critics] --out <folder>

The generator's fp32 masters are consolidated from the ZeRO partitions on disk
(`consolidate.engine_fp32_state_dict`, DeepSpeed's zero_to_fp32), with `--ema` the EMA
reassembled from the per-rank shards instead, and written with the trainer's own writer
(`export.write_pipeline_folder`): the folder equals what `MoGANTrainer.export` writes at
that step. No process group, no accelerator, no training world: one CPU process.

`--critics` also writes `<out>/critics/{fake_score,discriminator}.safetensors` (plain fp32
state dicts of the roles the run trained) for analysis; WanPipeline ignores the folder.

A LoRA run (``models.lora.generator.enabled``) checkpoints the generator's adapters only: the
export merges them into the base the run loaded (``models.generator``), ``W + (alpha / r) B A``
per adapted layer (`checkpoint.export.export_lora_merged`), and adds ``<out>/lora_adapter/``;
``--adapter-only`` writes just the adapter (peft's and diffusers' formats) to ``--out``.
(``--critics`` of a LoRA role writes its adapters, and D's heads, not a whole network.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError

# torch, DeepSpeed and diffusers are imported where they are used: `python -m mogan_ds`
# builds this parser for every subcommand, and a bad flag should fail in milliseconds.
DTYPES = ("fp32", "bf16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", dest="run_dir", required=True, help="the run's output.run_dir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--ema", action="store_true", help="export the generator's EMA instead of its weights")
    p.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    p.add_argument(
        "--critics", action="store_true", help="also write the fake score and discriminator to <out>/critics/"
    )
    p.add_argument(
        "--teacher-root",
        dest="teacher_root",
        default=None,
        help="the Wan release folder (default: the run's models.root), where VAE, text encoder etc. come from",
    )
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the written transformer")
    p.add_argument(
        "--adapter-only",
        dest="adapter_only",
        action="store_true",
        help="a LoRA run (models.lora.generator.enabled): write only the generator's adapter to --out, in peft's "
        "format (adapter_config.json, adapter_model.safetensors) and diffusers' (pytorch_lora_weights.safetensors), "
        "instead of the merged pipeline folder",
    )


def export_checkpoint(
    run_dir: str | Path,
    out: str | Path,
    step: int | None = None,
    ema: bool = False,
    critics: bool = False,
    teacher_root: str | Path | None = None,
    dtype: str = "fp32",
    adapter_only: bool = False,
) -> Path:
    import shutil

    import torch

    from ..checkpoint.consolidate import (
        engine_fp32_state_dict,
        find_checkpoint,
        full_ema,
        generator_config,
        generator_folder,
        run_config,
        trainable_order,
        trainer_states,
    )
    from ..checkpoint.export import export_lora_merged, write_pipeline_folder
    from ..models.lora import is_adapter_param, write_peft_adapter

    ckpt = find_checkpoint(run_dir, step)
    cfg = run_config(run_dir)
    root = Path(teacher_root or cfg.models.root)
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{root}: not a Wan diffusers release (no model_index.json); pass --teacher-root <folder>"
        )
    out = Path(out)
    # The writer replaces `out` whole: never let that be the run or the release it links from.
    for keep, what in ((Path(run_dir), "the run directory"), (root, "the teacher release")):
        if out.resolve() == keep.resolve() or out.resolve() in keep.resolve().parents:
            raise UserError(f"--out {out}: replacing it would delete {what} {keep}")
    tconfig = generator_config(cfg)
    lora = cfg.models.lora.generator if cfg.models.lora.generator.enabled else None
    if adapter_only and lora is None:
        raise UserError("--adapter-only: this run trained the whole generator (models.lora.generator.enabled=false)")
    state = engine_fp32_state_dict(ckpt, "generator")
    if ema:
        state.update(full_ema(trainer_states(ckpt), trainable_order(tconfig, lora)))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if lora is None:
        write_pipeline_folder(state, tconfig, root, out, torch_dtype)
    else:
        # The checkpoint holds the adapters only; the frozen base is the folder the run loaded.
        adapters = {k: v for k, v in state.items() if is_adapter_param(k)}
        if adapter_only:
            if out.exists():
                shutil.rmtree(out)
            write_peft_adapter(out, adapters, lora, torch_dtype)
        else:
            export_lora_merged(adapters, lora, generator_folder(cfg), root, out, torch_dtype)
    if critics:
        from safetensors.torch import save_file

        (out / "critics").mkdir(exist_ok=True)
        written = []
        for role in ("fake_score", "discriminator"):
            if (ckpt / role).is_dir():
                save_file(engine_fp32_state_dict(ckpt, role), str(out / "critics" / f"{role}.safetensors"))
                written.append(role)
        (out / "critics" / "info.json").write_text(json.dumps({"checkpoint": str(ckpt), "roles": written}) + "\n")
    (out / "mogan_export.json").write_text(
        json.dumps(
            {"checkpoint": str(ckpt.resolve()), "step": int(ckpt.name[5:]), "ema": ema, "lora": lora is not None}
        )
        + "\n"
    )
    return out


def run(args: argparse.Namespace) -> Path:
    out = export_checkpoint(
        args.run_dir, args.out, args.step, args.ema, args.critics, args.teacher_root, args.dtype, args.adapter_only
    )
    info = json.loads((out / "mogan_export.json").read_text())
    what = "the LoRA adapter of " if args.adapter_only else ("the merged LoRA generator of " if info["lora"] else "")
    print(f"exported {what}{'the EMA of ' if args.ema else ''}{info['checkpoint']} -> {out}")
    return out
