"""Checkpoints that resume everything, that a kill during a save cannot corrupt, and whose
damage is found before it is loaded.

Layout under `<run_dir>/checkpoints/`::

    step_00000008/
        generator/ fake_score/ discriminator/   DeepSpeed engine checkpoints (tag "state"):
                                                ZeRO-3 partitions + optimiser states (a LoRA
                                                role: its adapters only, not its frozen base)
        trainer/rank_00000.pt ...               per rank: step, data-stream positions,
                                                RNG states, EMA shard, counters
        COMPLETE                                the manifest (`integrity`): size and CRC-32
                                                of every file; written last
        DAMAGED                                 only if a resume found it damaged (the reason)
    latest                                      name of the newest complete checkpoint

A save goes to `step_N.partial/`; when every rank has written (and fsync'ed) its files,
rank 0 writes the manifest into it as COMPLETE and renames the folder to `step_N`. Resume
takes the newest `step_N` with COMPLETE and without DAMAGED, so a save killed half-way
leaves the previous checkpoint as the newest usable one. Old complete checkpoints beyond
`keep` are removed only after the new one is complete.

A save that fails on any rank (disk full, I/O error, permission) is agreed on by all ranks
(`storage`): the partial folder is removed, the previous checkpoint is untouched, and every
rank raises `CheckpointWriteError` with one line naming the file, the system's error and the
free space. `choose_resume` verifies a checkpoint against its manifest before anything is
loaded and falls back to the newest intact one.

The run directory must be on a filesystem every node sees (as DeepSpeed's own
checkpointing assumes).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..parallel.ranks import all_gather_object, barrier, process_rank, world_size
from .integrity import MARKER, ManifestError, check_files, crc32_file, manifest_text, read_manifest, share
from .storage import (
    CheckpointReadError,
    CheckpointWriteError,
    WriteLog,
    failed_path,
    free_space,
    guarded_engines,
    human_bytes,
    read_error_text,
    torch_save,
    write_file,
)

log = logging.getLogger(__name__)

ENGINE_TAG = "state"
DAMAGED = "DAMAGED"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class NoIntactCheckpointError(UserError):
    """--resume found complete checkpoints, every one of them damaged."""


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


def _first(problems: list[str], where: Path | None = None) -> str:
    more = f" (and {len(problems) - 1} more" + (f", listed in {where}" if where else "") + ")"
    return problems[0] + (more if len(problems) > 1 else "")


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    # ------------------------------------------------------------------ discovery
    def complete(self, include_damaged: bool = False) -> list[Path]:
        """Complete checkpoints, oldest first; those marked DAMAGED only with `include_damaged`."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if _STEP_DIR.match(p.name) and (p / MARKER).is_file() and (include_damaged or not (p / DAMAGED).exists())
        ]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The newest complete checkpoint not marked damaged: the one --resume starts from."""
        done = self.complete()
        return done[-1] if done else None

    def damaged(self) -> list[Path]:
        return [p for p in self.complete(include_damaged=True) if (p / DAMAGED).exists()]

    def mark_damaged(self, path: Path, reason: str) -> None:
        """Keep `path` from being resumed again (its files stay for inspection; deleting
        DAMAGED makes it a candidate again). Any rank may call it."""
        try:
            (path / DAMAGED).write_text(reason + "\n")
        except OSError as e:
            log.warning("could not mark %s damaged: %s", path, e)
        self._point_latest()

    def _point_latest(self) -> None:
        """`latest` names the newest usable checkpoint (the Slurm script tests for it)."""
        newest = self.latest()
        try:
            if newest is None:
                (self.root / "latest").unlink(missing_ok=True)
                return
            tmp = self.root / f".latest.{process_rank()}.tmp"
            tmp.write_text(newest.name + "\n")
            os.replace(tmp, self.root / "latest")
        except OSError as e:  # a hint only: resume scans the folders
            log.warning("could not update %s: %s", self.root / "latest", e)

    def summary(self, path: Path) -> str:
        """'<path> (12.3 GiB; 1.2 TiB free of 2.0 TiB)': a checkpoint's size and the room left."""
        try:
            manifest = read_manifest(path)
        except ManifestError:
            manifest = None
        size = f"{human_bytes(manifest['bytes'])}; " if manifest else ""
        return f"{path} ({size}{free_space(path)})"

    # ------------------------------------------------------------------ save
    def save(self, step: int, engines, trainer_state: dict) -> Path:
        """Collective: every rank calls it with its own `trainer_state`.

        Raises `CheckpointWriteError` on every rank when any rank's write failed; the
        partial folder is then gone and earlier checkpoints are as they were.
        """
        final = self.root / f"step_{step:08d}"
        partial = self.root / f"step_{step:08d}.partial"
        rank = process_rank()
        prepare = WriteLog()
        if rank == 0:
            try:
                # A previous attempt at this step that was killed, or a stale complete one
                # from a run that is being redone, must not mix with this save.
                for stale in (partial, final):
                    if stale.exists():
                        shutil.rmtree(stale)
                # Every folder is made here, so no rank's first write inside DeepSpeed is a mkdir
                # that can fail outside the guarded writes.
                for role, _ in engines.items():
                    (partial / role / ENGINE_TAG).mkdir(parents=True)
                (partial / "trainer").mkdir()
            except OSError as e:
                prepare.fail(failed_path(e, partial), e)
        self._agree(prepare, partial, step)

        writes = WriteLog(inside=partial)
        with guarded_engines(engines, writes):
            for role, engine in engines.items():
                # A LoRA role's frozen base is rebuilt from its weights at every start: not saved.
                frozen = {"exclude_frozen_parameters": True} if has_frozen(engine) else {}
                try:
                    engine.save_checkpoint(str(partial / role), tag=ENGINE_TAG, save_latest=False, **frozen)
                except OSError as e:
                    # DeepSpeed writes one thing outside the checkpoint engine: rank 0's copies of
                    # its recovery scripts (engine._copy_recovery_script), after its last
                    # collective but the closing barrier. Record the failure and take that barrier.
                    writes.fail(failed_path(e, partial / role), e)
                    barrier()
        own = partial / "trainer" / f"rank_{rank:05d}.pt"
        writes.attempt(own, lambda: torch_save({**trainer_state, "rng": rng_state()}, own))
        self._agree(writes, partial, step)

        # The manifest: what each rank wrote (sized and CRC'ed as written), plus what rank 0 finds
        # that went around the checkpoint engine (the recovery scripts).
        mine = {os.path.relpath(p, partial): v for p, v in writes.files.items()}
        gathered = all_gather_object(mine)
        commit = WriteLog()
        if rank == 0:
            try:
                files = {rel: v for part in gathered for rel, v in part.items()}
                for p in sorted(partial.rglob("*")):
                    rel = p.relative_to(partial).as_posix()
                    if p.is_file() and rel not in files:
                        files[rel] = crc32_file(p)
                text = manifest_text(step, files).encode()
                write_file(partial / MARKER, lambda f: f.write(text))
                os.replace(partial, final)  # from here on the checkpoint is complete
            except OSError as e:
                commit.fail(failed_path(e, partial / MARKER), e)
        self._agree(commit, partial, step)
        if rank == 0:
            self._point_latest()
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def _agree(self, writes: WriteLog, partial: Path, step: int) -> None:
        """Collective: raise CheckpointWriteError on every rank if any rank's writes failed."""
        errors = all_gather_object(writes.error)
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if not failed:
            return
        if process_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)  # gives the space back
        r, first = failed[0]
        more = f" (and on {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        prev = self.latest()
        kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        raise CheckpointWriteError(
            f"checkpoint of step {step} not saved: rank {r}: {first}{more}; {kept} (restart with --resume once "
            "the storage is fixed)"
        )

    # ------------------------------------------------------------------ verify
    def verify(self, path: Path, checksums: bool = False) -> list[str]:
        """Problems of `path` against its manifest, all ranks' shares together (empty: intact).

        Collective: each rank checks its share of the files (`integrity.share`).
        """
        try:
            manifest = read_manifest(path)
            if manifest is None:
                mine = []  # written before manifests: nothing to check against
            else:
                names = share(manifest["files"], process_rank(), world_size())
                mine = check_files(path, manifest["files"], names, checksums)
        except ManifestError as e:
            mine = [str(e)] if process_rank() == 0 else []
        return sorted(p for part in all_gather_object(mine) for p in part)

    def choose_resume(self, checksums: bool = False) -> Path | None:
        """The newest complete checkpoint that matches its manifest, or None when there is none.

        Collective. A damaged one is marked DAMAGED (so no later message or restart points at
        it) and reported in one line; with complete checkpoints but none intact, raises
        `NoIntactCheckpointError` naming the damaged files.
        """
        bad: list[tuple[Path, str]] = []
        chosen = None
        for path in reversed(self.complete()):
            problems = self.verify(path, checksums)
            if not problems:
                chosen = path
                break
            bad.append((path, _first(problems, Path(path.name) / DAMAGED)))
            if process_rank() == 0:
                self.mark_damaged(path, "\n".join(problems))
        if bad:
            barrier()  # the DAMAGED markers exist for every rank's later latest()
        if process_rank() == 0:
            for path, why in bad:
                then = f"resuming from {chosen.name} instead" if chosen else "no older checkpoint to resume from"
                log.warning("checkpoint %s is damaged: %s; marked %s/%s, %s", path.name, why, path.name, DAMAGED, then)
        if chosen is None:
            earlier = [(p, _first((p / DAMAGED).read_text().split("\n"))) for p in self.damaged() if p not in dict(bad)]
            damaged = bad + earlier
            if damaged:
                listing = "; ".join(f"{p.name}: {why}" for p, why in damaged)
                raise NoIntactCheckpointError(
                    f"--resume: no intact checkpoint under {self.root} (every complete one is damaged: {listing}); "
                    "start a new output.run_dir, or delete a checkpoint's DAMAGED marker to try it anyway"
                )
        return chosen

    # ------------------------------------------------------------------ load
    def load(self, path: Path, engines) -> dict:
        """Restore the engines (weights, optimiser, LR schedule) and return this rank's trainer state.

        A file that cannot be read raises CheckpointReadError naming it (`unloadable` then marks
        the checkpoint damaged).
        """
        with guarded_engines(engines):
            for role, engine in engines.items():
                # A LoRA role's saved module state holds its adapters only (its base is rebuilt, not loaded).
                frozen = {"load_module_strict": False} if has_frozen(engine) else {}
                load_dir, _ = engine.load_checkpoint(
                    str(path / role),
                    tag=ENGINE_TAG,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                    **frozen,
                )
                if load_dir is None:
                    raise FileNotFoundError(f"{path / role}: DeepSpeed found no checkpoint for {role}")
        f = path / "trainer" / f"rank_{process_rank():05d}.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no trainer state for this rank (resumed with a different world size?)")
        try:
            state = torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointReadError(read_error_text(f, e)) from e
        set_rng_state(state["rng"])
        return state

    def unloadable(self, path: Path, e: CheckpointReadError) -> CheckpointReadError:
        """Mark `path` damaged after a file of it failed to load; the error to raise names the file
        and the checkpoint a restart with --resume uses instead (never `path` again)."""
        self.mark_damaged(path, str(e))
        after = self.latest()
        then = f"a restart with --resume continues from {after.name}" if after else "no intact checkpoint is left"
        return CheckpointReadError(
            f"checkpoint {path.name} could not be loaded: {e}; marked {path.name}/{DAMAGED}, {then}"
        )
