"""Scale truth on a CPU: the paper's MoGAN configuration planned on fake tensors (`mogan_ds plan`).

Prints the plan table of wan2.1-t2v-1.3b on 2 nodes x 8 H200 and, as its last line, one JSON
object:

    fits, peak_gib_per_rank           the paper's 16 x H200 configuration
    mogan_over_dmd_flops              MoGAN iteration FLOPs / DMD-only (gan.enabled=false), per rank
    gan_overhead_share                share of the FLOPs MoGAN adds, by network
    act_mem_ratio_sp2                 generator GAN phase activation peak per rank, sp=2 / sp=1
    h100_1x8: {fits, peak_gib_per_rank, sp_size}   one node of 8 H100 (80 GB), sp from --h100-sp
    zero_presets: {cluster: {preset: {fits, peak_gib_per_rank, zero_comm_gib, est_iteration_s,
                   est_iteration_s_comm_serial}}}  the --ds_config as given, ZeRO-2 for the
                   generator and fake score (parallel.zero_stage.*=2), and the optimizer-offload
                   JSON, on both clusters (the stages change no traced figure: the trace is reused)

Not a timed test: four traced plans of the 1.3B recipe (the preset comparisons reuse them).

    python benchmarks/scale.py [--ds_config ds_configs/zero3_bf16.json] [--h100-sp 1] [key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mogan_ds.config import load_config  # noqa: E402 - after the OpenMP setting
from mogan_ds.plan.hardware import GIB  # noqa: E402
from mogan_ds.plan.report import format_plan, make_plan, verdict  # noqa: E402
from mogan_ds.train.roles import load_ds_config  # noqa: E402

RECIPE = "wan2.1-t2v-1.3b"
OFFLOAD = "ds_configs/zero3_bf16_offload.json"


def _preset_figures(p) -> dict:
    return {
        "fits": p.fits,
        "peak_gib_per_rank": round(p.peak_bytes / GIB, 2),
        "zero_comm_gib": round(sum(v for k, v in p.comm_bytes.items() if k.startswith("zero")) / GIB, 1),
        "est_iteration_s": round(p.seconds, 1),
        "est_iteration_s_comm_serial": round(p.seconds_serial, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ds_config", default="ds_configs/zero3_bf16.json")
    ap.add_argument("--h100-sp", dest="h100_sp", type=int, default=1, help="parallel.sp_size for the 1 x 8 H100 plan")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ds = load_ds_config(args.ds_config)
    cfg = load_config(RECIPE, args.overrides)
    t0 = time.perf_counter()

    paper = make_plan(cfg, ds, 2, 8, "h200")
    print(format_plan(paper), "\n", verdict(paper), sep="", flush=True)

    dmd_cfg = copy.deepcopy(cfg)
    dmd_cfg.gan.enabled = False
    dmd = make_plan(dmd_cfg, ds, 2, 8, "h200")
    mo, dm = paper.iteration_flops, dmd.iteration_flops
    added = {n: mo.by_network.get(n, 0) - dm.by_network.get(n, 0) for n in mo.by_network}
    added_total = sum(v for v in added.values() if v > 0)
    share = {n: round(v / added_total, 3) for n, v in sorted(added.items(), key=lambda kv: -kv[1]) if v > 0}

    def gan_phase_peak(p) -> int:
        return next(ph.act_peak_bytes for ph in p.run.phases if ph.name == "generator_gan")

    sp2_cfg = copy.deepcopy(cfg)
    sp2_cfg.parallel.sp_size = 2
    sp2 = make_plan(sp2_cfg, ds, 2, 8, "h200")

    h100_cfg = copy.deepcopy(cfg)
    h100_cfg.parallel.sp_size = args.h100_sp
    h100 = make_plan(h100_cfg, ds, 1, 8, "h100")
    print(f"1 x 8 H100, sp {args.h100_sp}: {verdict(h100)}", flush=True)

    offload_ds = load_ds_config(OFFLOAD)
    presets = {}
    for key, c, nodes, gpu in (("h200_2x8", cfg, 2, "h200"), ("h100_1x8", h100_cfg, 1, "h100")):
        z2 = copy.deepcopy(c)
        z2.parallel.zero_stage.generator = z2.parallel.zero_stage.fake_score = 2
        presets[key] = {
            name: _preset_figures(make_plan(pc, pds, nodes, 8, gpu))
            for name, pc, pds in (
                ("ds_config", c, ds),
                ("zero2_generator_fake_score", z2, ds),
                ("offload", c, offload_ds),
            )
            if name != "zero2_generator_fake_score" or c.parallel.sp_size == 1  # ZeRO-2 needs sp 1
        }

    print(
        json.dumps(
            {
                "fits": paper.fits,
                "peak_gib_per_rank": round(paper.peak_bytes / GIB, 2),
                "iteration_tflop_per_rank": round(mo.total / 1e12, 1),
                "est_iteration_s": round(paper.seconds, 1),
                "mogan_over_dmd_flops": round(mo.total / dm.total, 3),
                "gan_overhead_share": share,
                "act_mem_ratio_sp2": round(gan_phase_peak(sp2) / gan_phase_peak(paper), 3),
                "h100_1x8": {
                    "fits": h100.fits,
                    "peak_gib_per_rank": round(h100.peak_bytes / GIB, 2),
                    "sp_size": args.h100_sp,
                },
                "zero_presets": presets,
                "planner_wall_s": round(time.perf_counter() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
