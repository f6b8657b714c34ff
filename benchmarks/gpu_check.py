"""First contact with a GPU: one command proves the CUDA path and measures the paper's iteration against the planner.

Here, once (the wheels the GPU image lacks, into the git-ignored .whl/; benchmarks/README.md):

    bash tools/device_wheels.sh

On one H200 (carry [".whl"], timeout_s 570; this script keeps itself within --budget, 480 s):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1; \
        python3 benchmarks/gpu_check.py --out $OUT

On a CPU, the same parts at tiny shapes (tests/test_gpu_check.py runs it, so it cannot rot):

    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpu_check

Each part is a subprocess with its own time limit (a hang or an out-of-memory in one loses no
other's results), writes --out/<part>.json as it goes (status "running" until it ends) and, once
it has ended, is printed as one JSON line (also appended to --out/gpu_check.jsonl). Order:

  a_env       GPU, driver, torch/CUDA/cuDNN/NCCL/DeepSpeed/diffusers versions, nvcc and ninja (DeepSpeed's
              JIT), the attention backend `models.attention_backend=auto` resolves to, and a measured bf16
              8192^3 matmul (TFLOP/s: the ceiling for every MFU below).
  d_dit       the Wan2.1 1.3B DiT alone at the paper's shape (49x480x832: 13x60x104 latents, 20,280
              tokens, 512 text tokens), bf16, gradient checkpointing, forward + backward: TFLOP/s per
              attention backend that runs (FLOPs counted by torch's FlopCounterMode in the warm-up).
  b_launcher  the real launcher end to end on the tiny recipe (`deepspeed --num_gpus 1 launch/train.py
              --ds_config ds_configs/zero3_bf16.json --config tiny ...`): its tiny workdir is made and
              DeepSpeed's FusedAdam JIT-compiled in the background from the start (on the CPUs while a
              and d use the GPU), b waits for both (if it cannot build, torch's AdamW through optim.fused_adam=false for
              b and c, said so); then 4 steps with checkpoints at 2 and 4 (CUDA RNG in them), samples and
              the export; then a copy of the run cut back to its step-2 checkpoint resumes, and its steps
              3-4 must give the same losses.
  c_paper     the paper's iteration at world size 1: the wan2.1-t2v-1.3b recipe with full-size
              random-initialised networks written through the real save path (save_pretrained of
              WanTransformer3DModel / AutoencoderKLWan from the preset configs, a torchvision raft_large
              state dict), random prompt embeddings in the prompt-folder format at the real shape
              ([len, 4096], padded to 512), synthetic 49x480x832 clips as shards; then the real launcher
              with ds_configs/zero3_bf16.json, train.batch_size=1. Step 1 is the warm-up, steps 2-4 are
              timed (fewer if time runs short); the run is stopped once they are logged (it would next
              write a ~40 GB checkpoint that this check does not measure). From metrics.jsonl, per phase:
              wall time (time_<phase>, accelerator-synchronised), peak allocated and reserved memory
              (peak_mem_gib_<phase>, peak_reserved_gib_<phase>; 'n/a' where the build does not log them),
              beside the planner's figures for the same configuration (benchmarks/gpu_check_plans.json,
              recomputed in the background when the sources changed since): measured/planned peak,
              achieved TFLOP/s (planned FLOPs / measured time), and the iteration's MFU against the
              measured matmul ceiling and against the datasheet's 989. An out-of-memory is reported with
              its phase, and the run is repeated with the planner's memory levers
              (gan.vae_block_checkpoint=true gan.cache_checkpoint_every=0: the same losses, less memory).

What comes back under --out: the four part JSONs, gpu_check.jsonl, gpu_check.log (the parts' own
output) and c_rank0.log (the paper run's trainer log): 7 files. Work files (weights, shards, runs;
~4 GB for c) go to --work (default /tmp/mogan_gpu_check), never under --out.

`--write-plans` recomputes benchmarks/gpu_check_plans.json here (~3 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

# This file is the entry point: the arguments, and each part run as a subprocess of this script
# (--part). The parts and their helpers live in benchmarks/gpu/ (its __init__.py lists the modules).
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # mogan_ds, for the parts
    sys.path.insert(0, str(REPO))
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # benchmarks/, for the gpu package, when this file is imported (the tests)
    sys.path.insert(0, str(HERE))

from gpu.common import PART_NAMES, Mode, Report, kill_group, read_json, tail  # noqa: E402 - after sys.path
from gpu.dit import part_d  # noqa: E402
from gpu.env import part_a  # noqa: E402
from gpu.launcher_run import (  # noqa: E402
    FUSED_ADAM_RESULT,
    TINY_RESULT,
    build_fused_adam,
    part_b,
    prepare_tiny,
    watch_builder,
)
from gpu.paper import part_c  # noqa: E402
from gpu.plans import PLAN_SPECS, PLANS_FILE, compute_plan, write_plans  # noqa: E402

ORDER = ("a", "d", "b", "c")  # c last: it takes whatever time the others leave
PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}


def run_part(args) -> int:
    mode = Mode(args.cpu_smoke)
    rep = Report(Path(args.out), args.part)
    try:
        PARTS[args.part](rep, mode, args)
    except BaseException as e:
        import traceback

        rep.update(
            status="crashed", error=f"{type(e).__name__}: {str(e)[:1000]}", traceback=tail(traceback.format_exc())
        )
        raise
    return 0 if rep.data.get("status") == "ok" else 1


def headline(data: dict) -> dict:
    """The part's JSON without its bulky parts (rows, log tails): the line printed per check."""
    bulky = ("rows", "console_tail", "traceback", "output", "current")

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in bulky}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(data)


def orchestrate(args) -> int:
    mode = Mode(args.cpu_smoke)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "torch_adamw").unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(work / "torch_extensions"))  # FusedAdam's JIT build, shared
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: fail fast instead of waiting on a network
    env.setdefault("NCCL_DEBUG", "WARN")  # the first NCCL on this code path: say why if it fails
    env["PYTHONUNBUFFERED"] = "1"
    if mode.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    import importlib.util

    spec = importlib.util.find_spec("deepspeed")  # the `deepspeed` launcher script of a --target install
    if spec and spec.origin and (Path(spec.origin).parents[1] / "bin" / "deepspeed").is_file():
        env["PATH"] = f"{Path(spec.origin).parents[1] / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    parts = [p for p in ORDER if p in args.parts]
    t_start = time.monotonic()
    status = {}
    (work / FUSED_ADAM_RESULT).unlink(missing_ok=True)
    (work / TINY_RESULT).unlink(missing_ok=True)
    # CPU work for part b, started now on the CPUs that parts a and d leave idle; b waits for each.
    jobs = []
    if "b" in parts and not args.tiny:
        jobs.append(("--prepare-tiny", TINY_RESULT, "tiny_workdir.log"))  # models, shards, prompts
    if "b" in parts and not mode.cpu_smoke:
        jobs.append(("--build-fused-adam", FUSED_ADAM_RESULT, "fused_adam.log"))  # nvcc + ninja
    background = []
    for flag, result, log_name in jobs:
        proc = subprocess.Popen(
            [sys.executable, __file__, flag, "--work", str(work)],
            cwd=REPO,
            env=env,
            stdout=open(work / log_name, "w"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=watch_builder, args=(proc, work / result, log_name), daemon=True).start()
        background.append(proc)
    with open(out / "gpu_check.log", "a") as log:
        for part in parts:
            left = args.budget - (time.monotonic() - t_start)
            limit = min(mode.budget[part], left) if part != "c" else left
            path = out / f"{PART_NAMES[part]}.json"
            path.unlink(missing_ok=True)
            if limit < 20:
                data = {"check": PART_NAMES[part], "status": "skipped", "error": f"{left:.0f} s of --budget left"}
                path.write_text(json.dumps(data, indent=1) + "\n")
            else:
                cmd = [sys.executable, __file__, "--part", part, "--out", str(out), "--work", str(work)]
                cmd += ["--part-limit", str(int(limit) - 20)] + (["--cpu-smoke"] if mode.cpu_smoke else [])
                cmd += [f"--tiny={t}" for t in args.tiny] + [f"--c-extra={c}" for c in args.c_extra]
                cmd += [f"--c-rows={args.c_rows}", f"--c-profile={args.c_profile}"]
                cmd += ["--tiny-in-background"] if any(job[0] == "--prepare-tiny" for job in jobs) else []
                log.write(f"\n===== part {part} ({PART_NAMES[part]}), limit {limit:.0f} s\n")
                log.flush()
                t0 = time.monotonic()
                proc = subprocess.Popen(
                    cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
                try:
                    rc = proc.wait(timeout=limit)
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                    kill_group(proc.pid, proc=proc)
                data = read_json(path) or {"check": PART_NAMES[part], "status": "crashed", "error": "no JSON written"}
                pgid = data.pop("launcher_pgid", None)  # present only if the part died while its launcher ran
                if pgid:
                    kill_group(int(pgid), grace=5)
                if rc == "timeout":
                    data["status"] = "timeout"
                    data["error"] = f"ran past its limit of {limit:.0f} s; what it had written is kept"
                elif rc != 0 and data.get("status") in ("running", "ok"):
                    data["status"] = "crashed"
                data["wall_s"] = round(time.monotonic() - t0, 1)
                path.write_text(json.dumps(data, indent=1, default=str) + "\n")
            line = json.dumps(headline(data), default=str)
            print(line, flush=True)
            with open(out / "gpu_check.jsonl", "a") as fh:
                fh.write(line + "\n")
            status[part] = data["status"]
    for proc in background:
        if proc.poll() is None:
            kill_group(proc.pid, grace=5, proc=proc)
    for tmp in out.glob("*.tmp"):  # a part killed while rewriting its JSON: at most 8 files come back
        tmp.unlink()
    total = {"check": "summary", "status": status, "wall_s": round(time.monotonic() - t_start, 1)}
    print(json.dumps(total), flush=True)
    with open(out / "gpu_check.jsonl", "a") as fh:
        fh.write(json.dumps(total) + "\n")
    return 0 if all(s == "ok" for s in status.values()) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "runs" / "gpu_check"), help="the part JSONs and logs (small)")
    ap.add_argument("--work", default="/tmp/mogan_gpu_check", help="weights, shards and runs (large)")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same parts at tiny shapes on the CPU")
    ap.add_argument("--parts", default="".join(ORDER), help="which parts, e.g. 'ab' (always run in the order a d b c)")
    ap.add_argument("--budget", type=float, help="seconds for all parts together (480; --cpu-smoke 1200)")
    ap.add_argument(
        "--tiny", action="append", default=[], help="b: a tiny-workdir override (tests pass their fixture's)"
    )
    ap.add_argument("--c-extra", action="append", default=[], help="c: an extra recipe override key=value")
    ap.add_argument("--c-rows", type=int, default=0, help="c: metrics rows to wait for (0: the mode's, 4 on a GPU)")
    ap.add_argument(
        "--c-profile",
        type=int,
        default=0,
        help="c: profile this step (logging.profile_step): its phase times and top kernels join c_paper.json, "
        "its table is c_profile.txt; the row is left out of the timed comparison",
    )
    ap.add_argument("--write-plans", action="store_true", help=f"recompute {PLANS_FILE.name} and exit")
    ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--part-limit", type=float, default=600, help=argparse.SUPPRESS)
    ap.add_argument("--compute-plan", choices=sorted(PLAN_SPECS), help=argparse.SUPPRESS)
    ap.add_argument("--build-fused-adam", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prepare-tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tiny-in-background", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--plan-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_plans:
        return write_plans()
    if args.build_fused_adam:
        return build_fused_adam(Path(args.work))
    if args.prepare_tiny:
        return prepare_tiny(Path(args.work))
    if args.compute_plan:
        Path(args.plan_out).write_text(json.dumps(compute_plan(args.compute_plan), indent=1) + "\n")
        return 0
    if args.budget is None:
        args.budget = 1200.0 if args.cpu_smoke else 480.0
    if args.part:
        return run_part(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
