"""Stage 5: DMD distillation of the teacher into the few-step generator (the trainer, GAN off)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..trainer_runs import run_summary, train

if TYPE_CHECKING:
    from ..workdir import WorkFolder


def run(exp: WorkFolder, r: dict) -> dict:
    run_dir = exp.dir("dmd") / "run"
    train(exp, "dmd", run_dir, [], exp.echo)
    return run_summary(run_dir)
