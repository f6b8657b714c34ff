"""Part c: the paper's iteration at world size 1 through the real launcher, beside the planner's figures."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import GIB, PART_NAMES, REPO, SCRIPT, Mode, Report, file_tail, kill_group, read_json, round_sig, tail
from .launcher_run import oom_message, oom_phase, read_rows, trainer_facts
from .paper_inputs import write_random_models, write_random_prompts
from .plans import MEMORY_LEVERS, load_plan

DATASHEET_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16 (mogan_ds/plan/hardware.py)
# Per-phase memory keys of a metrics row (the trainer resets the peak statistics at each phase start).
PEAK_ALLOC_PREFIX, PEAK_RESERVED_PREFIX = "peak_mem_gib_", "peak_reserved_gib_"


def compare(
    rows: list[dict], plan: dict | None, ceiling_tflops: float | None, warmup: int = 1, skip: tuple = ()
) -> dict:
    """Measured (metrics rows after the warm-up, less the `skip` steps: a profiled one) beside planned,
    per phase and for the iteration."""
    timed = [r for r in rows[warmup:] if r.get("step") not in skip]
    if not timed:
        return {"note": "no timed iteration yet (the first is the warm-up)"}
    phases = list(plan["phase_flops"]) if plan else sorted(k[5:] for k in timed[0] if k.startswith("time_"))
    out = {"timed_steps": [r["step"] for r in timed], "phases": {}}

    def mean(vals):
        vals = [v for v in vals if isinstance(v, (int, float))]
        return sum(vals) / len(vals) if vals else None

    def peak(prefix, ph):
        vals = [r[prefix + ph] for r in timed if isinstance(r.get(prefix + ph), (int, float))]
        return max(vals) if vals and max(vals) > 0 else None

    states = plan["model_state_bytes"] / GIB if plan else None
    for ph in phases:
        sec = mean(r.get(f"time_{ph}") for r in timed)
        alloc, reserved = peak(PEAK_ALLOC_PREFIX, ph), peak(PEAK_RESERVED_PREFIX, ph)
        row = {
            "time_s": round_sig(sec),
            "peak_alloc_gib": round_sig(alloc) if alloc is not None else "n/a",
            "peak_reserved_gib": round_sig(reserved) if reserved is not None else "n/a",
        }
        if plan:
            planned_peak = states + plan["phase_act_peak_bytes"][ph] / GIB
            flops = plan["phase_flops"][ph]
            row |= {
                "planned_peak_gib": round_sig(planned_peak),
                "measured_over_planned_peak": round_sig(alloc / planned_peak) if alloc is not None else "n/a",
                "planned_tflop": round_sig(flops / 1e12),
                "achieved_tflops": round_sig(flops / sec / 1e12) if sec else None,
                "planned_s_at_assumed_mfu": round_sig(flops / (plan["bf16_dense_flops"] * plan["mfu_assumed"])),
            }
        out["phases"][ph] = row
    step_s = mean(r.get("step_time") for r in timed)
    phase_s = mean(sum(r.get(f"time_{ph}", 0.0) for ph in phases) for r in timed)
    allocs = [v["peak_alloc_gib"] for v in out["phases"].values() if v["peak_alloc_gib"] != "n/a"]
    it = {
        "step_time_s": round_sig(step_s),
        "sum_of_phases_s": round_sig(phase_s),
        # the largest phase peak; the row's own peak_mem_gib is since the last reset of the statistics
        "peak_alloc_gib": max(allocs) if allocs else "n/a",
        "peak_mem_gib_row": round_sig(max((r.get("peak_mem_gib") or 0) for r in timed)),
        "nonfinite_total": timed[-1].get("nonfinite_total"),
        "ceiling_tflops": ceiling_tflops,
    }
    if plan and step_s:
        achieved = plan["iteration_flops"] / step_s / 1e12
        it |= {
            "planned_tflop": round_sig(plan["iteration_flops"] / 1e12),
            "planned_s": round_sig(plan["est_iteration_s"]),
            "planned_mfu": plan["mfu_assumed"],
            "measured_over_planned_s": round_sig(step_s / plan["est_iteration_s"]) if plan["est_iteration_s"] else None,
            "achieved_tflops": round_sig(achieved),
            "mfu_vs_datasheet": round_sig(achieved / DATASHEET_BF16_TFLOPS),
            "mfu_vs_measured_ceiling": round_sig(achieved / ceiling_tflops) if ceiling_tflops else "n/a",
            "planned_peak_gib": round_sig(plan["peak_bytes"] / GIB),
            "planned_model_states_gib": round_sig(plan["model_state_bytes"] / GIB),
            "planned_fits": plan["fits"],
        }
    out["iteration"] = it
    return out


def part_c(rep: Report, mode: Mode, args) -> None:
    import torch  # noqa: F401 - imported before the writers so a broken install fails here, named

    from mogan_ds.config import load_config
    from mogan_ds.models.presets import PRESETS

    if args.c_rows:
        mode.c_rows = args.c_rows
    work = Path(args.work) / "c"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    deadline = time.monotonic() + args.part_limit
    cfg = load_config(mode.paper_recipe, [])
    a_env = read_json(Path(args.out) / f"{PART_NAMES['a']}.json") or {}
    ceiling = (a_env.get("matmul") or {}).get("tflops")
    rep.update(recipe=mode.paper_recipe, ds_config=mode.paper_ds, ceiling_tflops=ceiling)
    if args.c_extra:
        rep.update(c_extra=args.c_extra, c_extra_note="the planner's figures are for the run without these overrides")

    # The planner's figures: shipped, or recomputed in the background while the rest is set up.
    planners, plans = {}, {}
    for name in (mode.paper_plan, *(() if mode.cpu_smoke else (f"{mode.paper_plan}+levers",))):
        plan, fresh = load_plan(name)
        plans[name] = {"plan": plan, "fresh": fresh}
        if not fresh:
            f = work / f"plan_{name}.json"
            planners[name] = (
                subprocess.Popen(
                    [sys.executable, str(SCRIPT), "--compute-plan", name, "--plan-out", str(f)],
                    cwd=REPO,
                    env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                    stdout=subprocess.DEVNULL,
                    stderr=open(work / f"plan_{name}.log", "w"),  # noqa: SIM115 - lives as long as the planner
                ),
                f,
            )
    rep.update(plans_shipped_fresh={k: v["fresh"] for k, v in plans.items()})

    def plan_for(name: str) -> tuple[dict | None, str]:
        if name in planners:
            proc, f = planners[name]
            if proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(1.0, min(60.0, deadline - time.monotonic() - 5)))
            if proc.poll() == 0 and f.is_file():
                return json.loads(f.read_text()), "computed on this machine (the shipped figures were stale)"
            if plans[name]["plan"]:
                return plans[name]["plan"], "shipped, computed from older sources (the recomputation did not finish)"
            return None, "unavailable"
        return plans[name]["plan"], "shipped, computed from these sources"

    # Data and weights, written once: shards in the background, networks and prompts meanwhile.
    t0 = time.monotonic()
    shards, prompts, models = work / "shards", work / "prompts", work / "models"
    maker = subprocess.Popen(
        [
            sys.executable,
            "data_tools/make_synthetic.py",
            "--out",
            str(shards),
            "--num-clips",
            str(mode.clips),
            "--frames",
            str(cfg.video.num_frames),
            "--size",
            f"{cfg.video.height}x{cfg.video.width}",
            "--fps",
            str(cfg.video.fps),
            "--shards",
            str(mode.shards),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    preset = PRESETS[cfg.models.arch]
    sizes = write_random_models(models, cfg.models.arch, cfg.models.raft_arch)
    t_models = time.monotonic() - t0
    write_random_prompts(
        prompts,
        16,
        cfg.text.max_length,
        preset["text_encoder"]["d_model"],
        cfg.text.negative_prompt,
        cfg.text.disc_prompt,
    )
    shards_out, _ = maker.communicate(timeout=max(10, deadline - time.monotonic()))
    if maker.returncode != 0:
        rep.update(status="failed", error="synthetic shards", output=tail(shards_out))
        return
    rep.update(
        setup={
            "seconds": round(time.monotonic() - t0, 1),
            "models_s": round(t_models, 1),
            **sizes,
            "clips": mode.clips,
            "clip_shape": [cfg.video.num_frames, cfg.video.height, cfg.video.width],
            "prompt_embedding": [cfg.text.max_length, preset["text_encoder"]["d_model"]],
        }
    )

    env_extra, adam = {}, []
    fallback = Path(args.work) / "torch_adamw"
    if fallback.is_file():
        adam = ["optim.fused_adam=false"]
        rep.update(optimizer_note="torch AdamW (optim.fused_adam=false): FusedAdam did not build in part b")
    base = [
        "--ds_config",
        str(REPO / mode.paper_ds),
        "--config",
        mode.paper_recipe,
        f"models.root={models / 'wan'}",
        f"models.generator={models / 'wan' / 'transformer'}",
        f"models.raft={models / (cfg.models.raft_arch + '.pth')}",
        f"data.shards={shards}",
        f"data.prompts={prompts}",
        "train.batch_size=1",
        "train.max_steps=1000",
        "output.checkpoint_every=1000",
        "logging.sample_every=0",
        "logging.wandb_mode=disabled",
        *adam,
        *args.c_extra,
        *([f"logging.profile_step={args.c_profile}"] if args.c_profile else []),
    ]
    skip = (args.c_profile,) if args.c_profile else ()
    if args.c_profile:
        rep.update(profile_step=args.c_profile, profile_note="that row is left out of the timed comparison")
    attempts = [("recipe", [], mode.paper_plan)]
    if not mode.cpu_smoke:
        attempts.append(("memory levers", MEMORY_LEVERS, f"{mode.paper_plan}+levers"))
    results = []
    for name, extra, plan_name in attempts:
        run_dir = work / f"run_{len(results)}"
        console = work / f"run_{len(results)}.console.txt"
        att = {"name": name, "overrides": extra, "plan": plan_name}
        results.append(att)
        res = run_paper(
            rep,
            [*base, *extra, f"output.run_dir={run_dir}"],
            run_dir,
            console,
            env_extra,
            deadline,
            mode,
            lambda rows, plan=plans[plan_name]["plan"]: compare(rows, plan, ceiling, skip=skip),
        )
        att |= res
        rep.update(attempts=results)
        log = run_dir / "logs" / "rank_00000.log"
        if log.is_file():
            with open(log, "rb") as src, open(Path(args.out) / "c_rank0.log", "wb") as dst:
                src.seek(max(0, log.stat().st_size - 8 * 2**20))
                shutil.copyfileobj(src, dst)
        plan, source = plan_for(plan_name)
        att["plan_source"] = source
        att["comparison"] = compare(res.get("rows", []), plan, ceiling, skip=skip)
        profile = run_dir / "logs" / f"profile_step_{args.c_profile}"
        if args.c_profile and profile.with_suffix(".json").is_file():
            att["profile"] = read_json(profile.with_suffix(".json"))
            shutil.copyfile(profile.with_suffix(".txt"), Path(args.out) / "c_profile.txt")
        rep.data.pop("current", None)
        rep.update(attempts=results)
        if res["status"] != "oom" or deadline - time.monotonic() < 120:
            break
        att["next"] = "repeated with the planner's memory levers"
    last = results[-1]
    timed = len([r for r in last.get("rows", [])[1:] if r.get("step") not in skip])
    rep.update(status="ok" if last["status"] in ("ok", "stopped") and timed >= 1 else last["status"])
    for proc, _ in planners.values():
        if proc.poll() is None:
            proc.kill()


def run_paper(rep, args_, run_dir: Path, console: Path, env_extra: dict, deadline: float, mode: Mode, so_far) -> dict:
    """Start the launcher, follow metrics.jsonl, stop it once the timed rows are in (or time is short).

    Each new row is written to the part's JSON at once with `so_far(rows)` (the comparison with the
    shipped plan), so a timeout keeps every iteration that finished.
    """
    from mogan_ds.cli.launcher import deepspeed_command, launch_env

    cmd = deepspeed_command(1, REPO / "launch" / "train.py", args_)
    t0 = time.monotonic()
    fh = open(console, "w")  # noqa: SIM115 - the launcher writes into it until it is stopped
    fh.write("+ " + " ".join(cmd) + "\n")
    fh.flush()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=launch_env(env_extra), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
    )
    rep.update(launcher_pgid=proc.pid)  # the orchestrator stops this group too if the part is killed
    res, seen, first_row = {"command": " ".join(cmd[1:])}, 0, None
    try:
        while True:
            rc = proc.poll()
            rows = read_rows(run_dir)
            if len(rows) > seen:
                seen = len(rows)
                first_row = first_row or time.monotonic() - t0
                res |= {"rows": rows, "first_row_s": round(first_row, 1)}
                rep.update(current={**res, "comparison_so_far": so_far(rows)})
            if rc is not None:
                text = file_tail(console, 400_000) + file_tail(run_dir / "logs" / "rank_00000.log", 400_000)
                phase = oom_phase(text)
                res |= {"exit_code": rc, "status": "oom" if phase else "failed"}
                if phase:
                    res |= {"oom_phase": phase, "oom_message": oom_message(text)}
                res["console_tail"] = file_tail(console)
                break
            if seen >= mode.c_rows:
                res["status"] = "ok"
                break
            left = deadline - time.monotonic()
            step = rows[-1].get("step_time", 0) if rows else 0
            if seen >= 2 and left < 1.3 * step + 20:
                res |= {"status": "stopped", "note": f"stopped after {seen} rows: {left:.0f} s left"}
                break
            if left < 15:
                res |= {"status": "timeout", "note": f"{seen} rows logged when time ran out"}
                res["console_tail"] = file_tail(console)
                break
            time.sleep(1.0)
    finally:
        kill_group(proc.pid, proc=proc)  # stops the run; after its own exit, what its group left (loader workers)
        fh.close()
        rep.data.pop("launcher_pgid", None)  # stopped: nothing left for the orchestrator to stop
    res["seconds"] = round(time.monotonic() - t0, 1)
    res.update(trainer_facts(run_dir, console))
    return res
