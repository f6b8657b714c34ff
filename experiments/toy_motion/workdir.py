"""The toy experiment's work folder: the stages' recipes and keys, which stages are done, and
stages kept outside it (saved by one work folder, reused by another).

Each stage reads its recipe (``stageN_*.yaml`` next to this file; at the smoke size
``smoke.yaml`` overrides some keys), works in ``<work>/<stage>/`` and ends by writing
``done.json`` with a key: the hash of its recipe and of every upstream stage's key. A stage
whose ``done.json`` holds the current key is skipped, so a changed recipe re-runs that stage
and everything after it. Inside a stage, training loops checkpoint every
``checkpoint_every`` steps and continue from there when restarted; the trainer stages
resume through ``launch/train.py --resume``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from .clips import load_clips

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STAGES = ("data", "raft", "vae", "teacher", "dmd", "mogan", "eval")
RECIPES = {
    "data": "stage1_data.yaml",
    "raft": "stage2_raft.yaml",
    "vae": "stage3_vae.yaml",
    "teacher": "stage4_teacher.yaml",
    "dmd": "stage5_dmd.yaml",
    "mogan": "stage6_mogan.yaml",
    "eval": "stage7_eval.yaml",
}


SCALES = {"full": None, "smoke": "smoke.yaml", "gpu": "gpu.yaml"}


def load_recipe(stage: str, scale: str = "full") -> dict:
    """A stage's recipe; at the smoke or gpu scale with smoke.yaml's / gpu.yaml's keys for it applied.

    For the trainer stages the scale's keys are `key=value` overrides, kept under
    ``overrides``; for the others they replace the recipe's top-level keys.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    recipe = yaml.safe_load((HERE / RECIPES[stage]).read_text())
    if stage == "mogan":  # the rows live beside the trainer recipe, which the trainer reads as it is
        recipe["rows"] = yaml.safe_load((HERE / "stage6_rows.yaml").read_text())
    if SCALES[scale]:
        over = yaml.safe_load((HERE / SCALES[scale]).read_text())
        extra = over.get(stage)
        if isinstance(extra, list):
            recipe["overrides"] = list(extra)
        elif extra:
            recipe.update(extra)
        if stage == "mogan" and "mogan_rows" in over:
            recipe["rows"] = {k: v for k, v in recipe["rows"].items() if k in over["mogan_rows"]}
    return recipe


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_keys(recipes: dict[str, dict]) -> dict[str, str]:
    """Every stage's key: the hash of its name and of its recipe and every upstream stage's."""
    keys: dict[str, str] = {}
    upstream: list = []
    for s in STAGES:
        upstream = [*upstream, recipes[s]]
        keys[s] = _key(s, upstream)
    return keys


class WorkFolder:
    """One work folder under one scale's recipes: a folder per stage, each done under its key,
    and where the stages leave what later stages read."""

    # What a finished stage keeps only to resume, not needed downstream: the training checkpoint
    # (model, optimiser, RNG) and the teacher's encoded training windows (24 MB at full size); the
    # key file, which reusing writes anew.
    TRAINING_STATE = ("ckpt.pt", "latents.pt", "key")
    # Folders a stage writes beside its own: the teacher writes the WanPipeline release (models/)
    # every later stage loads. A saved stage holds them under `beside/`.
    BESIDE = {"teacher": ("models",)}

    def __init__(
        self, work: str | Path, scale: str = "full", results: str | Path | None = None, echo=print, device="cpu"
    ):
        import torch

        self.work = Path(work).resolve()
        self.scale = scale
        # Where stages 2-4 train and where rendering and measuring run (run.py's --device); the
        # stage keys do not depend on it, so a stage made on one device is reused on another.
        self.device = torch.device(device)
        # Where the evaluation's tables and grids go, and where the stages report progress.
        self.results = Path(results).resolve() if results else self.work / "results"
        self.echo = echo
        self.recipes = {s: load_recipe(s, scale) for s in STAGES}
        self.keys = stage_keys(self.recipes)

    # ------------------------------------------------------------------ what the stages leave

    @property
    def raft_path(self) -> Path:
        """Stage 2's frozen RAFT: the experiment's flow instrument."""
        return self.work / "raft" / "raft_small.pth"

    @property
    def models(self) -> Path:
        """Stage 4's release: models/wan (WanPipeline layout) and models/generator."""
        return self.work / "models"

    def clips(self, split: str) -> list:
        """Stage 1's clips of a split ("train" or "heldout"), see `clips.load_clips`."""
        return load_clips(self.work / "data" / split)

    def clip_frames(self) -> int:
        """Frames of the clips the trainer sees (video.num_frames): the VAE's and teacher's evaluation windows."""
        return int(self.recipes["dmd"]["video"]["num_frames"])

    def paths_overrides(self) -> list[str]:
        """The trainer's config keys that point into this folder."""
        m = self.models
        return [
            f"models.root={m / 'wan'}",
            f"models.generator={m / 'generator'}",
            f"models.raft={self.raft_path}",
            f"data.shards={self.work / 'data' / 'train'}",
            f"data.prompts={self.work / 'data' / 'prompts'}",
        ]

    def trainer_config(self, stage: str, extra: list[str] = ()):
        """A trainer stage's recipe as the trainer reads it, pointed at this folder."""
        from mogan_ds.config import load_config

        return load_config(str(HERE / RECIPES[stage]), [*self.paths_overrides(), *extra])

    # ------------------------------------------------------------------ done records

    def dir(self, stage: str) -> Path:
        d = self.work / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _record(self, stage: str) -> dict | None:
        p = self.work / stage / "done.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def done(self, stage: str) -> dict | None:
        """The stage's done record ({"key", "report"}) if it finished under its current key."""
        rec = self._record(stage)
        return rec if rec is not None and rec.get("key") == self.keys[stage] else None

    def report(self, stage: str) -> dict:
        rec = self.done(stage)
        if rec is None:
            raise RuntimeError(f"stage {stage} has not finished in {self.work}")
        return rec["report"]

    def begin(self, stage: str) -> None:
        """Ready a stage's folder to run under its current key."""
        # A re-run of a stage whose recipe changed starts clean, not from stale checkpoints.
        stale = self.work / stage / "key"
        if stale.is_file() and stale.read_text() != self.keys[stage]:
            shutil.rmtree(self.work / stage)
        self.dir(stage)
        (self.work / stage / "key").write_text(self.keys[stage])

    def finish(self, stage: str, report: dict) -> None:
        rec = {"key": self.keys[stage], "report": report}
        (self.work / stage / "done.json").write_text(json.dumps(rec, indent=1))

    def recorded_key(self, stage: str) -> str | None:
        """The key a stage recorded when it finished (whatever the recipes are now), or None."""
        rec = self._record(stage)
        return None if rec is None else rec["key"]

    # ------------------------------------------------------------------ kept stages

    def save_stage(self, stage: str, dest: str | Path) -> Path:
        """Copy a finished stage's folder (and the folders it writes beside it) to `dest` without its
        training state, e.g. to keep a long stage's models (stage 3's VAE: 60-90 minutes here) for
        a later work folder."""
        if self.done(stage) is None:
            raise RuntimeError(f"stage {stage} has not finished in {self.work} under the current recipes")
        dest = Path(dest)
        if dest.exists():
            raise FileExistsError(f"{dest} exists; saving a stage does not overwrite")
        shutil.copytree(self.work / stage, dest, ignore=shutil.ignore_patterns(*self.TRAINING_STATE))
        for name in self.BESIDE.get(stage, ()):
            shutil.copytree(self.work / name, dest / "beside" / name)
        return dest

    def reuse_stage(self, stage: str, src: str | Path) -> None:
        """Take a stage saved by `save_stage` (or another work folder's) as this folder's finished
        stage. Its key must be this experiment's: the same recipes for it and every stage before it.
        Training a stage again on the same recipes does not give bit-identical models (threaded CPU
        kernels), so reusing is how a later run changes only the stages it means to."""
        src = Path(src)
        done = src / "done.json"
        if not done.is_file():
            raise FileNotFoundError(f"{src} holds no finished stage (no done.json)")
        key = json.loads(done.read_text()).get("key")
        if key != self.keys[stage]:
            raise ValueError(
                f"{src} was made by other recipes than this experiment's for stages "
                f"{', '.join(STAGES[: STAGES.index(stage) + 1])} (key {key}, expected {self.keys[stage]})"
            )
        if self.done(stage):
            return
        beside = [src / "beside" / name for name in self.BESIDE.get(stage, ())]
        missing = [str(b) for b in beside if not b.is_dir()]
        if missing:
            raise FileNotFoundError(f"{src} lacks what stage {stage} writes beside its folder: {', '.join(missing)}")
        for d in [stage, *(b.name for b in beside)]:
            if (self.work / d).exists():
                shutil.rmtree(self.work / d)
        shutil.copytree(src, self.work / stage, ignore=shutil.ignore_patterns("beside"))
        for b in beside:
            shutil.copytree(b, self.work / b.name)
        (self.work / stage / "key").write_text(self.keys[stage])
