"""The planner's figures part c compares against: shipped in gpu_check_plans.json, recomputed when stale."""

from __future__ import annotations

import hashlib
import json
import time

from .common import REPO, read_json

PLANS_FILE = REPO / "benchmarks" / "gpu_check_plans.json"

# The planner's levers for the motion path's memory: the same losses, less memory (README, Cluster).
MEMORY_LEVERS = ["gan.vae_block_checkpoint=true", "gan.cache_checkpoint_every=0"]
# Configurations c runs, as the planner plans them (one rank of one H200; world size 1).
PLAN_SPECS = {
    "wan2.1-t2v-1.3b": {
        "recipe": "wan2.1-t2v-1.3b",
        "ds_config": "ds_configs/zero3_bf16.json",
        "overrides": ["train.batch_size=1"],
    },
    "wan2.1-t2v-1.3b+levers": {
        "recipe": "wan2.1-t2v-1.3b",
        "ds_config": "ds_configs/zero3_bf16.json",
        "overrides": ["train.batch_size=1", *MEMORY_LEVERS],
    },
    "tiny": {"recipe": "tiny", "ds_config": "ds_configs/zero3_cpu.json", "overrides": ["train.batch_size=1"]},
}


def plan_sources_sha() -> str:
    """Fingerprint of what the planner's figures depend on: the package, the recipes, the DeepSpeed JSONs."""
    h = hashlib.sha256()
    files = sorted(REPO.glob("mogan_ds/**/*.py")) + sorted(REPO.glob("mogan_ds/recipes/*.yaml"))
    for f in files + sorted(REPO.glob("ds_configs/*.json")):
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def compute_plan(name: str) -> dict:
    """The planner's figures for PLAN_SPECS[name] on one H200 (world size 1), at full precision."""
    from mogan_ds.config import load_config
    from mogan_ds.plan.report import make_plan, summary
    from mogan_ds.train.roles import load_ds_config

    spec = PLAN_SPECS[name]
    cfg = load_config(spec["recipe"], spec["overrides"])
    p = make_plan(cfg, load_ds_config(REPO / spec["ds_config"]), 1, 1, "h200")
    return {
        **spec,
        "command": f"python -m mogan_ds plan --config {spec['recipe']} --ds_config {spec['ds_config']} "
        f"--nodes 1 --gpus-per-node 1 --gpu h200 {' '.join(spec['overrides'])}",
        "sources_sha256": plan_sources_sha(),
        "fits": p.fits,
        "peak_bytes": p.peak_bytes,
        "usable_bytes": p.gpu.usable_bytes,
        "model_state_bytes": p.state_bytes,
        "model_state_bytes_by_network": {s.name: s.gpu_bytes for s in p.states},
        "phase_repeats": {ph.name: ph.repeats for ph in p.run.phases},
        "phase_flops": {ph.name: ph.flops.total * ph.repeats for ph in p.run.phases},
        "phase_act_peak_bytes": {ph.name: ph.act_peak_bytes for ph in p.run.phases},
        "iteration_flops": p.iteration_flops.total,
        "est_iteration_s": p.seconds,
        "mfu_assumed": p.mfu,
        "bf16_dense_flops": p.gpu.bf16_dense_flops,
        "summary": summary(p),
    }


def load_plan(name: str) -> tuple[dict | None, bool]:
    """(the shipped figures for `name` or None, whether they were computed from the current sources)."""
    entry = (read_json(PLANS_FILE) or {}).get(name)
    return entry, bool(entry) and entry.get("sources_sha256") == plan_sources_sha()


def write_plans() -> int:
    plans = {}
    for name in PLAN_SPECS:
        t0 = time.time()
        plans[name] = compute_plan(name)
        print(f"{name}: {plans[name]['summary']['peak_gib_per_rank']} GiB, {time.time() - t0:.0f} s", flush=True)
    PLANS_FILE.write_text(json.dumps(plans, indent=1, sort_keys=True) + "\n")
    print(f"wrote {PLANS_FILE}")
    return 0
