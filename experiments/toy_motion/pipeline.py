"""The toy-world experiment, stage by stage: data, RAFT, VAE, teacher, DMD, MoGAN (+ ablations), evaluation.

`Experiment` runs the stages (``stages/``, one module each) in order over one work folder,
skipping those done under their current keys; the work folder's bookkeeping (recipes, keys,
done records, kept stages) is `workdir.WorkFolder`'s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .clips import load_clips
from .stages import data, dmd, evaluate, mogan, raft, teacher, vae
from .stages.data import HELDOUT_SEED_OFFSET
from .workdir import HERE, REPO, STAGES, WorkFolder, load_recipe

# The names callers took from this module when it held the stages too.
__all__ = ["HELDOUT_SEED_OFFSET", "HERE", "REPO", "STAGES", "Experiment", "load_clips", "load_recipe"]


class Experiment(WorkFolder):
    """The seven stages over one work folder; `run()` does what is not done yet."""

    def run(self, stages: list[str] | None = None) -> dict:
        wanted = stages or list(STAGES)
        for s in STAGES:
            if s not in wanted:
                continue
            if self.done(s):
                self.echo(f"[toy] {s}: done (cached in {self.work / s})")
                continue
            self.begin(s)
            self.echo(f"[toy] {s}: running")
            t0 = time.time()
            report = getattr(self, f"stage_{s}")(self.recipes[s])
            report["seconds"] = round(time.time() - t0, 1)
            self.finish(s, report)
            self.echo(f"[toy] {s}: {json.dumps(report)}")
        return {s: (self.done(s) or {}).get("report") for s in STAGES}

    # One method per stage, each given its recipe (`run` passes the experiment's).

    def stage_data(self, r: dict) -> dict:
        return data.run(self, r)

    def stage_raft(self, r: dict) -> dict:
        return raft.run(self, r)

    def stage_vae(self, r: dict) -> dict:
        return vae.run(self, r)

    def stage_teacher(self, r: dict) -> dict:
        return teacher.run(self, r)

    def stage_dmd(self, r: dict) -> dict:
        return dmd.run(self, r)

    def stage_mogan(self, r: dict) -> dict:
        return mogan.run(self, r)

    def stage_eval(self, r: dict) -> dict:
        return evaluate.run(self, r)

    def remeasure(self, raft_path: str | Path) -> dict:
        """Stage 7 with another toy RAFT as the flow instrument (`stages.evaluate.remeasure`)."""
        return evaluate.remeasure(self, raft_path)
