"""Checkpoints that resume everything, and that a kill during a save cannot corrupt.

Layout under `<run_dir>/checkpoints/`::

    step_00000008/
        generator/ fake_score/ discriminator/   DeepSpeed engine checkpoints (tag "state"):
                                                ZeRO-3 partitions + optimiser states (a LoRA
                                                role: its adapters only, not its frozen base)
        trainer/rank_00000.pt ...               per rank: step, data-stream positions,
                                                RNG states, EMA shard, counters
        COMPLETE                                written last, after every rank finished
    latest                                      name of the newest complete checkpoint

A save goes to `step_N.partial/` and is renamed only after a barrier, when every rank has
written; COMPLETE is then added. Resume takes the newest directory that has COMPLETE, so
a save killed half-way leaves the previous checkpoint as the newest usable one. Old
complete checkpoints beyond `keep` are removed only after the new one is complete.
The run directory must be on a filesystem every node sees (as DeepSpeed's own
checkpointing assumes).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..parallel.ranks import barrier, process_rank

ENGINE_TAG = "state"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def has_frozen(engine) -> bool:
    """Whether an engine's module has frozen parameters (a LoRA role's base): they are rebuilt from the
    weights folders at every start, so its checkpoint leaves them out (DeepSpeed's
    ``exclude_frozen_parameters``: adapters, their optimizer states and the schedule only)."""
    module = getattr(engine, "module", None)
    return module is not None and any(not p.requires_grad for p in module.parameters())


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    # ------------------------------------------------------------------ discovery
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, engines, trainer_state: dict) -> Path:
        """Collective: every rank calls it with its own `trainer_state`."""
        final = self.root / f"step_{step:08d}"
        partial = self.root / f"step_{step:08d}.partial"
        if process_rank() == 0:
            # A previous attempt at this step that was killed, or a stale complete one
            # from a run that is being redone, must not mix with this save.
            for stale in (partial, final):
                if stale.exists():
                    shutil.rmtree(stale)
            partial.mkdir(parents=True)
        barrier()
        for role, engine in engines.items():
            # A LoRA role's frozen base is rebuilt from its weights at every start: not saved.
            frozen = {"exclude_frozen_parameters": True} if has_frozen(engine) else {}
            engine.save_checkpoint(str(partial / role), tag=ENGINE_TAG, save_latest=False, **frozen)
        (partial / "trainer").mkdir(exist_ok=True)
        tmp = partial / "trainer" / f".rank_{process_rank():05d}.pt.tmp"
        torch.save({**trainer_state, "rng": rng_state()}, tmp)
        os.replace(tmp, partial / "trainer" / f"rank_{process_rank():05d}.pt")
        barrier()
        if process_rank() == 0:
            os.replace(partial, final)
            (final / "COMPLETE").write_text(f"{step}\n")
            tmp_latest = self.root / ".latest.tmp"
            tmp_latest.write_text(final.name + "\n")
            os.replace(tmp_latest, self.root / "latest")
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    # ------------------------------------------------------------------ load
    def load(self, path: Path, engines) -> dict:
        """Restore the engines (weights, optimiser, LR schedule) and return this rank's trainer state."""
        for role, engine in engines.items():
            # A LoRA role's saved module state holds its adapters only (its base is rebuilt, not loaded).
            frozen = {"load_module_strict": False} if has_frozen(engine) else {}
            load_dir, _ = engine.load_checkpoint(
                str(path / role), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True, **frozen
            )
            if load_dir is None:
                raise FileNotFoundError(f"{path / role}: DeepSpeed found no checkpoint for {role}")
        f = path / "trainer" / f"rank_{process_rank():05d}.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no trainer state for this rank (resumed with a different world size?)")
        state = torch.load(f, map_location="cpu", weights_only=False)
        set_rng_state(state["rng"])
        return state
