"""Resume a checkpoint on another cluster shape: dp x sp = A written, dp' x sp' = B resuming.

ZeRO-3 partitions every parameter, its fp32 master and both Adam moments over all dp*sp
ranks (`Topology.zero_group`), so a checkpoint of A ranks holds A partitions that B ranks
cannot load directly (DeepSpeed refuses: "Automatic adjustment of ZeRO's optimizer state
partitioning with a new world size is not currently supported"). What changes with the
shape, and how each part is carried over:

* Engines (weights, fp32 masters, Adam moments and step, LR schedule): DeepSpeed's universal
  checkpoint. Rank 0 converts each role's engine checkpoint once with
  `deepspeed.checkpoint.ds_to_universal` into `<step>/universal/<role>/state` (one folder
  per parameter with its full fp32 value and moments); the engines are built with
  `checkpoint.load_universal = true` (`universal_ds_config`) and each rank slices its new
  partition out of the full tensors (`DeepSpeedZeroOptimizer_Stage3._load_universal_checkpoint`).
* EMA: the per-rank shards are partitions of the same ZeRO-3 layout (`consolidate`), so
  the new rank's shard is the slice `[r*part', (r+1)*part')` of the concatenated old
  shards (`reshard_ema`). Each rank reads every old rank's trainer file: host memory per
  rank is one full fp32 EMA (plus what torch.load holds of the other states) while resuming.
* Data streams (`data.streaming`): a stream is a pure function of (seed, dp_rank, logical
  worker) and a cursor, and the shards are dealt by dp_size. Same dp_size (only sp
  changes, e.g. dp 2 x sp 1 -> dp 2 x sp 2): every dp rank continues its stream exactly.
  Another dp_size: the deal of shards to ranks changes, so no old cursor applies to a new
  slot; every new dp rank starts its slot's stream from its beginning (same seed). No
  sample is skipped; samples seen before the reshape can be seen again before the new
  slots' first cycle ends. That is what a changed split implies for a resampled stream.
* Python/NumPy/torch RNG: new rank r takes old rank r mod A's state. Training randomness
  is drawn from generators seeded by (seed, step, phase, micro, dp rank) (see trainer), so
  a reshaped run draws the same per-dp-rank noise as a run started on B at that step.

What stays the same: the step, the LR schedule, the non-finite counters, the weights and
optimizer states to the bit (fp32 tensors are only re-sliced).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import math
import os
import shutil
from pathlib import Path

import torch

from ..parallel.ranks import barrier, process_rank
from .consolidate import trainer_states
from .manager import ENGINE_TAG, set_rng_state
from .storage import CheckpointReadError, read_error_text

log = logging.getLogger(__name__)

UNIVERSAL = "universal"


def saved_layout(ckpt: Path) -> dict:
    f = ckpt / "trainer" / "rank_00000.pt"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no trainer state in {ckpt}")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)["layout"]
    except Exception as e:  # truncated or damaged: say which file
        raise CheckpointReadError(read_error_text(f, e)) from e


def needs_reshape(ckpt: Path | None, topo) -> bool:
    """True when `ckpt` was written with another dp x sp than this run's."""
    if ckpt is None:
        return False
    return saved_layout(ckpt) != {"dp": topo.dp_size, "sp": topo.sp_size}


def universal_ds_config(base: dict) -> dict:
    """The DeepSpeed dict with universal-checkpoint loading on (read at engine build time)."""
    ds = copy.deepcopy(base)
    ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def to_universal(ckpt: Path, roles: list[str]) -> Path:
    """Convert each role's engine checkpoint to DeepSpeed's universal format, once. Rank 0 only.

    Written to `<ckpt>/universal.partial` and renamed, so a conversion killed half-way is
    redone on the next attempt instead of being loaded.
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    final = ckpt / UNIVERSAL
    if final.is_dir():
        return final
    tmp = ckpt / f"{UNIVERSAL}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    for role in roles:
        args = argparse.Namespace(
            input_folder=str(ckpt / role / ENGINE_TAG),
            output_folder=str(tmp / role / ENGINE_TAG),
            # ds_to_universal's worker pools: one each keeps the conversion within one core
            # and its memory to one parameter at a time (it is I/O bound anyway).
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
        # It narrates each stage on stdout; keep the training log readable.
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal(args)
    os.replace(tmp, final)
    return final


def reshard_ema(states: list[dict], order: list[tuple[str, torch.Size]], rank: int, world: int) -> dict:
    """This rank's EMA state for a world of `world` ranks, from the old ranks' `states`.

    Old shard i of rank q is the slice [q*p, (q+1)*p) of parameter i's zero-padded flat
    values (p = ceil(numel / old world)); the new shard is the slice [r*p', (r+1)*p') of
    the same values padded for the new world. One parameter is assembled at a time.
    """
    shards = [s["ema"]["shadow"] for s in states]
    if any(len(sh) != len(order) for sh in shards):
        raise ValueError(f"EMA shards hold {len(shards[0])} tensors, the generator has {len(order)} parameters")
    shadow = []
    for i, (_name, shape) in enumerate(order):
        numel = shape.numel()
        flat = torch.cat([sh[i].reshape(-1).float() for sh in shards])[:numel]
        part = math.ceil(numel / world)
        mine = torch.zeros(part, dtype=torch.float32)
        lo, hi = rank * part, min((rank + 1) * part, numel)
        if hi > lo:
            mine[: hi - lo] = flat[lo:hi]
        shadow.append(mine)
    return {"decay": states[0]["ema"]["decay"], "shadow": shadow}


def load_reshaped(ckpt: Path, engines, topo, ema_order: list[tuple[str, torch.Size]] | None) -> dict:
    """Restore the engines from `ckpt` written on another layout; return this rank's trainer state.

    Collective. The engines must have been built with `universal_ds_config`.
    """
    if ema_order is not None and not all(hasattr(p, "ds_id") for p in engines.generator.module.parameters()):
        # ZeRO-1/2 EMA shards are optimizer fragments with another layout (master_weights).
        raise RuntimeError("resuming an EMA on another dp x sp layout is implemented for ZeRO-3 engines only")
    roles = [role for role, _ in engines.items()]
    if process_rank() == 0:
        to_universal(ckpt, roles)
    barrier()
    for role, engine in engines.items():
        load_dir, _ = engine.load_checkpoint(
            str(ckpt / UNIVERSAL / role), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_dir is None:
            raise FileNotFoundError(f"{ckpt / UNIVERSAL / role}: DeepSpeed found no universal checkpoint for {role}")
    old = trainer_states(ckpt)
    saved = old[0]["layout"]
    rank, world = topo.rank, topo.world_size
    mine = old[rank % len(old)]
    state = {
        "step": mine["step"],
        "nonfinite_total": mine["nonfinite_total"],
        "layout": {"dp": topo.dp_size, "sp": topo.sp_size},
        "rng": mine["rng"],
        "ema": None,
        "prompts": None,
        "clips": None,
    }
    if saved["dp"] == topo.dp_size:
        # Same deal of shards to dp ranks: continue each stream where it stopped (its SP
        # peers held identical stream states; take the first of the old SP group).
        src = old[topo.dp_rank * saved["sp"]]
        state["prompts"], state["clips"] = src["prompts"], src["clips"]
    if ema_order is not None and old[0].get("ema") is not None:
        state["ema"] = reshard_ema(old, ema_order, rank, world)
    set_rng_state(state["rng"])
    if rank == 0:
        log.info(
            "resumed %s written as dp %d x sp %d on dp %d x sp %d (universal checkpoint; data streams %s)",
            ckpt,
            saved["dp"],
            saved["sp"],
            topo.dp_size,
            topo.sp_size,
            "continued" if saved["dp"] == topo.dp_size else "restarted for the new data-parallel split",
        )
    return state
