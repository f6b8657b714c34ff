"""Stage 6: the MoGAN rows (stage6_rows.yaml: MoGAN, its ablations and the DMD-only control),
each a trainer run from stage 5's DMD generator with the same steps and seed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..trainer_runs import exported, run_summary, train

if TYPE_CHECKING:
    from ..workdir import WorkFolder


def run(exp: WorkFolder, r: dict) -> dict:
    gen = exported(exp.work / "dmd" / "run")
    report = {}
    for name, extra in r["rows"].items():
        run_dir = exp.dir("mogan") / name
        if not (exported(run_dir) / "config.json").is_file():
            train(exp, "mogan", run_dir, [f"models.generator={gen}", *extra], exp.echo)
        report[name] = run_summary(run_dir)
    return report
