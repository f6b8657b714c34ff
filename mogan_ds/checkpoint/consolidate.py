"""Read a run's checkpoint from disk without the training world: full fp32 weights and the EMA.

A checkpoint (`mogan_ds.checkpoint`) holds, per trainable role, a DeepSpeed ZeRO engine
checkpoint (tag "state": one `*_optim_states.pt` per rank with that rank's flat fp32
master partitions, one `*_model_states.pt` with names, shapes and buffers), and per rank a
trainer state whose "ema" holds the generator EMA of that rank's partitions only.

* Weights: DeepSpeed's `zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` concatenates
  the ranks' fp32 partitions of every parameter and trims the padding. These are the
  optimizer's masters, the values the trainer's own export reads (`master_weights.full_master`).
* EMA: `ema.ShardedEMA` keeps one tensor per trainable generator parameter (module order),
  each this rank's ZeRO-3 partition of the parameter (`safe_get_local_fp32_param`: a flat
  `ceil(numel / world)` slice, zero-padded on the last rank). ZeRO-3 partitions over
  `Topology.zero_group` = all dp*sp ranks in global-rank order, so the full EMA of a
  parameter is the concatenation of the shards of ranks 0..world-1 cut to `numel`.

Everything here runs in a plain process on CPU (no process group, no accelerator).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import torch

from ..errors import BadFileError, UserError
from .manager import ENGINE_TAG, CheckpointManager

ROLES = ("generator", "fake_score", "discriminator")
_RANK_FILE = re.compile(r"^rank_(\d{5})\.pt$")


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The complete checkpoint of `step` (default: the newest complete one) under `run_dir`."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"--run-dir {run}: no such directory")
    mgr = CheckpointManager(run)
    done = mgr.complete()
    have = ", ".join(str(int(p.name[5:])) for p in done) or "none"
    if step is None:
        if not done:
            raise UserError(f"--run-dir {run}: no complete checkpoint under {mgr.root}")
        return done[-1]
    path = mgr.root / f"step_{step:08d}"
    if path.is_dir() and not (path / "COMPLETE").is_file():
        raise UserError(
            f"{path}: incomplete checkpoint (no COMPLETE marker: its save was interrupted); complete: {have}"
        )
    if not path.is_dir():
        partial = path.with_name(path.name + ".partial")
        if partial.is_dir():
            raise UserError(f"{partial}: step {step} was never completed (save interrupted); complete: {have}")
        raise UserError(f"--step {step}: no checkpoint of that step under {mgr.root}; complete: {have}")
    return path


def run_config(run_dir: str | Path):
    """The resolved config the run recorded (`<run_dir>/config.yaml`)."""
    from ..config import load_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run's recorded config is missing")
    return load_config(path)


def trainer_states(ckpt: Path) -> list[dict]:
    """Every rank's trainer state, indexed by global rank; checked against the recorded layout."""
    files = sorted((ckpt / "trainer").glob("rank_*.pt")) if (ckpt / "trainer").is_dir() else []
    ranks = [int(_RANK_FILE.match(f.name).group(1)) for f in files if _RANK_FILE.match(f.name)]
    if not ranks or ranks != list(range(len(ranks))):
        raise BadFileError(f"{ckpt / 'trainer'}: expected rank_00000.pt .. one per rank, found ranks {ranks}")
    states = [torch.load(ckpt / "trainer" / f"rank_{r:05d}.pt", map_location="cpu", weights_only=False) for r in ranks]
    layout = states[0]["layout"]
    if layout["dp"] * layout["sp"] != len(states):
        raise BadFileError(f"{ckpt / 'trainer'}: {len(states)} rank files for layout dp x sp = {layout}")
    return states


def engine_dir(ckpt: Path, role: str) -> Path:
    d = ckpt / role / ENGINE_TAG
    if not d.is_dir():
        raise BadFileError(f"{d}: no DeepSpeed checkpoint of the {role} (role disabled in this run?)")
    return d


def engine_fp32_state_dict(ckpt: Path, role: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict (masters + buffers) of one role, by DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine_dir(ckpt, role)
    # zero_to_fp32 narrates every stage on stdout and draws progress bars on stderr: a CLI
    # that exports several engines would bury its own output; errors still propagate.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / role), tag=ENGINE_TAG)
        except (ValueError, FileNotFoundError, IndexError) as e:
            raise BadFileError(f"{ckpt / role}: unreadable DeepSpeed checkpoint ({' '.join(str(e).split())})") from e
    # Shared parameters come back as one tensor under two names; callers get independent tensors.
    return {k: v.detach().clone() for k, v in state.items()}


def generator_folder(cfg) -> Path:
    """The folder the trainer loads the generator from (models.generator, else the teacher's transformer)."""
    from ..models.builders import wan_paths

    return Path(cfg.models.generator) if cfg.models.generator else wan_paths(cfg.models.root)["transformer"]


def generator_config(cfg) -> dict:
    """The generator's WanTransformer3DModel config (the folder the trainer loaded it from)."""
    from ..models.builders import read_transformer_config

    return read_transformer_config(generator_folder(cfg))


def trainable_order(transformer_config: dict, lora=None) -> list[tuple[str, torch.Size]]:
    """(name, shape) of the generator's trainable parameters in module order: the order of the EMA's shards.

    `ShardedEMA` keeps the `requires_grad` parameters in `module.parameters()` order: every
    parameter of a fully trained generator, the adapters of a LoRA one (`lora`: its
    ``models.lora.generator`` section, injected here as the trainer injects it). Built on the
    meta device: no memory, any size.
    """
    from diffusers import WanTransformer3DModel

    from ..models.lora import add_lora

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(transformer_config)
        if lora is not None:
            add_lora(model, lora, 0, "generator")
    return [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]


def full_ema(states: list[dict], order: list[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    """The whole EMA of the generator from the per-rank shards of `trainer_states`."""
    if any(s.get("ema") is None for s in states):
        raise UserError("this run kept no EMA (train.ema_decay=0): export without --ema")
    world = len(states)
    shards = [s["ema"]["shadow"] for s in states]
    if any(len(sh) != len(order) for sh in shards):
        raise BadFileError(f"EMA shards hold {len(shards[0])} tensors, the generator has {len(order)} parameters")
    out = {}
    for i, (name, shape) in enumerate(order):
        part = math.ceil(shape.numel() / world)
        pieces = [sh[i].reshape(-1) for sh in shards]
        if any(p.numel() != part for p in pieces):
            raise BadFileError(f"EMA shard of {name}: {pieces[0].numel()} values per rank, expected {part}")
        out[name] = torch.cat(pieces)[: shape.numel()].view(shape).float().clone()
    return out
