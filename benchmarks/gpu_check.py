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
              --ds_config ds_configs/zero3_bf16.json --config tiny ...`): DeepSpeed's FusedAdam is
              JIT-compiled in the background from the start (nvcc + ninja on the CPUs while a and d use
              the GPU), b waits for it (if it cannot build, torch's AdamW through optim.fused_adam=false for
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
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PLANS_FILE = REPO / "benchmarks" / "gpu_check_plans.json"
PART_NAMES = {"a": "a_env", "b": "b_launcher", "c": "c_paper", "d": "d_dit"}
ORDER = ("a", "d", "b", "c")  # c last: it takes whatever time the others leave
DATASHEET_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16 (mogan_ds/plan/hardware.py)
GIB = 2**30

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
# Loss keys a resumed run must reproduce (as tests/test_train_launch.py compares them).
COMPARED = ("dmd_loss", "dmd_grad_norm", "fake_score_loss", "g_gan_loss", "d_loss", "d_real_logit", "d_fake_logit")
# Per-phase memory keys of a metrics row (the trainer resets the peak statistics at each phase start).
PEAK_ALLOC_PREFIX, PEAK_RESERVED_PREFIX = "peak_mem_gib_", "peak_reserved_gib_"
# Trainer methods whose name in a traceback says which phase ran out of memory.
PHASE_METHODS = {
    "generator_dmd_gan_update": "generator_dmd_gan",
    "generator_dmd_update": "generator_dmd",
    "fake_score_update": "fake_score",
    "generator_gan_update": "generator_gan",
    "discriminator_update": "discriminator",
}


class Mode:
    """Everything that differs between the H200 run and the CPU smoke run: shapes, budgets, configs."""

    def __init__(self, cpu_smoke: bool):
        self.cpu_smoke = cpu_smoke
        if cpu_smoke:
            self.device = "cpu"
            self.paper_recipe, self.paper_plan = "tiny", "tiny"
            self.paper_ds = "ds_configs/zero3_cpu.json"
            self.tiny_ds = "ds_configs/zero3_cpu.json"
            self.budget = {"a": 90, "d": 120, "b": 400, "c": 300}
            self.matmul_n, self.matmul_reps = 512, (1, 3)
            self.dit_iters = 1
            self.b_steps, self.b_extra = 3, ["train.batch_size=1", "dmd.critic_updates=1"]
            self.c_rows, self.clips, self.shards = 3, 2, 1
        else:
            self.device = "cuda"
            self.paper_recipe, self.paper_plan = "wan2.1-t2v-1.3b", "wan2.1-t2v-1.3b"
            self.paper_ds = "ds_configs/zero3_bf16.json"
            self.tiny_ds = "ds_configs/zero3_bf16.json"
            self.budget = {"a": 40, "d": 70, "b": 170, "c": 420}
            self.matmul_n, self.matmul_reps = 8192, (20, 50)
            self.dit_iters = 2
            self.b_steps, self.b_extra = 4, []
            self.c_rows, self.clips, self.shards = 4, 8, 4


# ============================================================================ small helpers


class Report:
    """One part's JSON file, rewritten atomically at every update: a kill loses nothing written before."""

    def __init__(self, out: Path, part: str):
        self.path = out / f"{PART_NAMES[part]}.json"
        self.data = {"check": PART_NAMES[part], "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.t0 = time.monotonic()
        self.write()

    def update(self, **kw) -> None:
        self.data.update(kw)
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def _file_tail(path: Path, n: int = 3000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - n))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _kill_group(pgid: int, grace: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM a process group (DeepSpeed's launcher passes it on to its ranks), then SIGKILL what is left.

    `proc`, the group's leader when it is our child, is reaped meanwhile (a zombie still counts as a member).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if proc is not None:
            proc.poll()
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _gib(v):
    return None if v is None else round(v / GIB, 2)


def _r(v, sig=4):
    """`v` to `sig` significant digits (tiny CPU figures keep theirs), None when missing or not finite."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return float(f"{v:.{sig}g}")


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ============================================================================ planner figures


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
    from mogan_ds.train.engines import load_ds_config

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
    entry = (_read_json(PLANS_FILE) or {}).get(name)
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


# ============================================================================ part a: environment


def part_a(rep: Report, mode: Mode, args) -> None:
    import importlib.metadata as md
    import importlib.util
    import platform

    pkgs = {}
    for name in ("torch", "torchvision", "deepspeed", "diffusers", "transformers", "accelerate", "safetensors", "av"):
        try:
            spec = importlib.util.find_spec(name)
            pkgs[name] = {"version": md.version(name), "from": str(Path(spec.origin).parent.parent) if spec else None}
        except Exception as e:  # noqa: BLE001 - a missing package is a finding, not a failure of the check
            pkgs[name] = {"version": None, "error": str(e)[:200]}
    for name in ("webdataset", "pydantic", "hjson", "numpy", "triton", "flash-attn", "wandb"):
        try:
            pkgs[name] = {"version": md.version(name)}
        except md.PackageNotFoundError:
            pkgs[name] = {"version": None}
    rep.update(python=platform.python_version(), executable=sys.executable, packages=pkgs)

    def run(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return (r.stdout or r.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"unavailable: {e}"

    tools = {
        "nvidia_smi": run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"]
        ),
        "nvcc": run(["nvcc", "--version"]).splitlines()[-1:],
        "ninja": run(["ninja", "--version"]),
    }
    rep.update(tools=tools)

    import torch

    env = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / GIB, 2),
            "multiprocessors": props.multi_processor_count,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "sdpa_enabled": {
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
        }
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        env["cuda_home"] = CUDA_HOME
    except Exception as e:  # noqa: BLE001
        env["cuda_home"] = f"unavailable: {e}"
    rep.update(torch_env=env)

    # The bf16 matmul ceiling (fp32 on the CPU smoke: its bf16 GEMM is not what a CPU is measured by).
    n, (warm, reps) = mode.matmul_n, mode.matmul_reps
    dtype = torch.bfloat16 if mode.device == "cuda" else torch.float32
    a = torch.randn(n, n, device=mode.device, dtype=dtype)
    b = torch.randn(n, n, device=mode.device, dtype=dtype)
    for _ in range(warm):
        a @ b
    _sync(mode.device)
    if mode.device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = time.perf_counter() - t0
    rep.update(
        matmul={
            "n": n,
            "dtype": str(dtype).replace("torch.", ""),
            "reps": reps,
            "tflops": _r(2 * n**3 * reps / seconds / 1e12),
            "timer": "CUDA events" if mode.device == "cuda" else "perf_counter",
        }
    )
    del a, b

    from deepspeed.accelerator import get_accelerator
    from diffusers.utils import is_flash_attn_available

    from mogan_ds.parallel.attention import resolve_attention_backend

    rep.update(
        deepspeed_accelerator=get_accelerator()._name,
        attention={
            "auto_resolves_to": resolve_attention_backend("auto", device=mode.device),
            "flash_attn_installed": is_flash_attn_available(),
        },
        status="ok",
    )


# ============================================================================ part d: the DiT alone

CUDA_BACKENDS = ("native", "_native_flash", "_native_cudnn", "_native_efficient", "flash", "_flash_3")
CPU_BACKENDS = ("native", "_native_flash", "_native_math")


def part_d(rep: Report, mode: Mode, args) -> None:
    import torch
    from diffusers import WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    from mogan_ds.config import load_config
    from mogan_ds.models.presets import PRESETS
    from mogan_ds.motion.latents import latent_shape
    from mogan_ds.plan.flops import count_flops

    cfg = load_config(mode.paper_recipe, [])
    tcfg = PRESETS[cfg.models.arch]["transformer"]
    dev, dtype = torch.device(mode.device), torch.bfloat16
    torch.manual_seed(0)
    with dev:
        model = WanTransformer3DModel(**tcfg)
    model.to(dtype).train()
    model.enable_gradient_checkpointing()
    shape = latent_shape(cfg.video, 1)
    x = torch.randn(shape, device=dev, dtype=dtype)
    t = torch.tensor([500.0], device=dev)
    ctx = torch.randn(1, cfg.text.max_length, tcfg["text_dim"], device=dev, dtype=dtype)
    p = tcfg["patch_size"]
    tokens = shape[2] // p[0] * (shape[3] // p[1]) * (shape[4] // p[2])
    rep.update(
        recipe=mode.paper_recipe,
        params=sum(q.numel() for q in model.parameters()),
        latents=list(shape),
        tokens=tokens,
        text_tokens=cfg.text.max_length,
        dtype="bfloat16",
        gradient_checkpointing=True,
        iterations=mode.dit_iters,
        flops_note="FlopCounterMode over one forward + backward, recomputation of the checkpointed blocks included",
    )

    def step():
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def count_warmup(fn) -> int:
        """The warm-up step, its FLOPs counted: by network as the planner counts, else torch's plain counter."""
        try:
            return count_flops(fn, {model: "dit"})[1].total
        except Exception:  # noqa: BLE001 - count_flops seeds a private map of FlopCounterMode's module tracker
            model.zero_grad(set_to_none=True)
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            return counter.get_total_flops()

    results = {}
    for name in CUDA_BACKENDS if dev.type == "cuda" else CPU_BACKENDS:
        try:
            model.set_attention_backend(name)
        except Exception as e:  # noqa: BLE001 - a backend whose package is missing is reported, not fatal
            results[name] = {"status": "unavailable", "error": str(e)[:300]}
            rep.update(backends=results)
            continue
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            flops = count_warmup(step)
            _sync(dev)
            times = []
            for _ in range(mode.dit_iters):
                t0 = time.perf_counter()
                if dev.type == "cuda":
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    step()
                    e.record()
                    e.synchronize()
                    times.append(s.elapsed_time(e) / 1e3)
                else:
                    step()
                    times.append(time.perf_counter() - t0)
            sec = sorted(times)[len(times) // 2]
            results[name] = {
                "status": "ok",
                "time_s": round(sec, 4),
                "times_s": [round(v, 4) for v in times],
                "flops": flops,
                "tflops": _r(flops / sec / 1e12),
                "peak_mem_gib": _gib(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None,
            }
        except torch.OutOfMemoryError as e:
            results[name] = {"status": "oom", "error": str(e)[:300]}
        except Exception as e:  # noqa: BLE001 - e.g. a forced SDPA kernel that does not support the shape
            results[name] = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:300]}"}
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rep.update(backends=results)
    ok = {k: v for k, v in results.items() if v["status"] == "ok"}
    if ok:
        # The same maths whichever kernel: where a kernel's FLOP formula is missing its count is low.
        work = max(v["flops"] for v in ok.values())
        for v in ok.values():
            v["tflops_at_max_count"] = _r(work / v["time_s"] / 1e12)
        ceiling = ((_read_json(Path(args.out) / f"{PART_NAMES['a']}.json") or {}).get("matmul") or {}).get("tflops")
        for v in ok.values():
            v["mfu_vs_measured_ceiling"] = _r(v["tflops_at_max_count"] / ceiling) if ceiling else "n/a"
        best = max(ok, key=lambda k: ok[k]["tflops_at_max_count"])
        rep.update(backends=results, flops=work, fastest=best, ceiling_tflops=ceiling, status="ok")
    else:
        rep.update(status="failed", error="no attention backend ran")


# ============================================================================ launcher helpers


def launch(rep: Report, args_: list[str], console: Path, env_extra: dict | None = None, timeout: float | None = None):
    """`deepspeed --num_gpus 1 launch/train.py ...` in its own process group; returns (exit code, seconds).

    The group's id is in the part's JSON while it runs: if the part is killed, the orchestrator stops it.
    """
    from mogan_ds.cli.launcher import deepspeed_command, launch_env

    cmd = deepspeed_command(1, REPO / "launch" / "train.py", args_)
    t0 = time.monotonic()
    with open(console, "w") as fh:
        fh.write("+ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=launch_env(env_extra), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        rep.update(launcher_pgid=proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        _kill_group(proc.pid, grace=5, proc=proc)  # what is left of its group (a loader worker), if anything
        rep.data.pop("launcher_pgid", None)
    return rc, round(time.monotonic() - t0, 1)


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def trainer_facts(run_dir: Path, console: Path) -> dict:
    """What the trainer said about itself: the attention backend it set, DeepSpeed's basic optimizer."""
    text = _file_tail(console, 200_000) + _file_tail(run_dir / "logs" / "rank_00000.log", 2_000_000)
    facts = {}
    m = re.search(r"world \d+ = dp \d+ x sp \d+ on (\w+); attention: (\S+)", text)
    if m:
        facts["device"], facts["attention"] = m.group(1), m.group(2)
    opt = sorted(set(re.findall(r"Basic Optimizer = (\w+)", text)))
    if opt:
        facts["deepspeed_basic_optimizer"] = opt
    return facts


def oom_phase(text: str) -> str | None:
    """Which phase a CUDA out-of-memory traceback came from ('setup' before the first phase)."""
    if "OutOfMemoryError" not in text and "out of memory" not in text:
        return None
    methods = re.findall(r", in (\w+)\n", text)
    phases = [PHASE_METHODS[m] for m in methods if m in PHASE_METHODS]
    return phases[-1] if phases else "setup"


def oom_message(text: str) -> str | None:
    m = re.search(r"(CUDA out of memory\.[^\n]*)", text)
    return m.group(1)[:600] if m else None


# ============================================================================ part b: the launcher, tiny


FUSED_ADAM_RESULT = "fused_adam.json"  # in --work: written by the background build (build_fused_adam)
FUSED_ADAM_WAIT_S = 150  # how long part b waits for it (it starts with part a, on the CPUs the GPU parts leave idle)


def build_fused_adam(work: Path) -> int:
    """DeepSpeed's FusedAdam, JIT-compiled as the trainer would (nvcc + ninja, TORCH_EXTENSIONS_DIR);
    the outcome goes to <work>/fused_adam.json. The orchestrator starts it beside parts a and d."""
    t0 = time.monotonic()
    try:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().create_op_builder("FusedAdamBuilder").load()
        result = {"built": True}
    except BaseException as e:  # noqa: BLE001 - the failure is the finding; b falls back on it
        result = {"built": False, "error": f"{type(e).__name__}: {_tail(str(e), 1500)}"}
    result["seconds"] = round(time.monotonic() - t0, 1)
    tmp = work / (FUSED_ADAM_RESULT + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, work / FUSED_ADAM_RESULT)
    return 0 if result["built"] else 1


def _watch_builder(proc: subprocess.Popen, work: Path) -> None:
    """If the background build dies without its result file (a crash), write one: b stops waiting."""
    rc = proc.wait()
    if not (work / FUSED_ADAM_RESULT).is_file():
        (work / FUSED_ADAM_RESULT).write_text(
            json.dumps({"built": False, "error": f"the build process exited with {rc} (see fused_adam.log)"})
        )


def part_b(rep: Report, mode: Mode, args) -> None:
    work = Path(args.work) / "b"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    if args.tiny:
        overrides = list(args.tiny)
    else:
        from mogan_ds.cli.demo import prepare_tiny_workdir, tiny_overrides

        overrides = tiny_overrides(prepare_tiny_workdir(Path(args.work) / "tiny", clips=12, frames=16))
    rep.update(ds_config=mode.tiny_ds, tiny_workdir_s=round(time.monotonic() - t0, 1))

    env_extra, adam = {}, []
    if mode.device == "cuda":
        t0, result = time.monotonic(), Path(args.work) / FUSED_ADAM_RESULT
        while not result.is_file() and time.monotonic() - t0 < FUSED_ADAM_WAIT_S:
            time.sleep(1.0)
        fused = _read_json(result) or {"built": False, "error": f"no result after {FUSED_ADAM_WAIT_S} s more"}
        fused["waited_s"] = round(time.monotonic() - t0, 1)
        if not fused["built"]:
            # The same maths; the fallback is stated here and used by part c too.
            (Path(args.work) / "torch_adamw").write_text(fused.get("error", ""))
            adam = ["optim.fused_adam=false"]
            fused["fallback"] = "torch AdamW (optim.fused_adam=false)"
            fused["log_tail"] = _file_tail(Path(args.work) / "fused_adam.log", 2000)
        rep.update(fused_adam=fused)
    else:
        rep.update(fused_adam={"built": None, "note": "CPU accelerator: torch's AdamW (train.roles.ds_config_for)"})

    steps = mode.b_steps
    run_a, run_b = work / "run", work / "resumed"
    common = [
        "--ds_config",
        str(REPO / mode.tiny_ds),
        "--config",
        "tiny",
        *overrides,
        f"train.max_steps={steps}",
        "output.checkpoint_every=2",
        f"logging.sample_every={steps}",
        "logging.wandb_mode=disabled",
        "data.num_workers=1",
        *adam,
        *mode.b_extra,
    ]
    rc, sec = launch(rep, [*common, f"output.run_dir={run_a}"], work / "run.console.txt", env_extra)
    rows = read_rows(run_a)
    run = {
        "exit_code": rc,
        "seconds": sec,
        "steps_logged": [r["step"] for r in rows],
        **trainer_facts(run_a, work / "run.console.txt"),
    }
    if rc != 0:
        run["console_tail"] = _file_tail(work / "run.console.txt")
        rep.update(run=run, status="failed", error="the launcher run failed")
        return
    finite = all(isinstance(r.get(k), float) and math.isfinite(r[k]) for r in rows for k in COMPARED if k in r)
    ckpts = sorted(p.name for p in (run_a / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
    import torch

    state = torch.load(
        run_a / "checkpoints" / ckpts[-1] / "trainer" / "rank_00000.pt", map_location="cpu", weights_only=False
    )
    run |= {
        "losses_finite": finite,
        "last_row": {k: v for k, v in rows[-1].items() if not k.startswith("lr_")},
        "checkpoints": ckpts,
        "checkpoint_rng": sorted(state["rng"]),
        "samples": sorted(p.name for p in (run_a / "samples").glob("*.mp4")),
    }
    from diffusers import WanTransformer3DModel

    exported = WanTransformer3DModel.from_pretrained(run_a / "export" / "transformer")
    run["export"] = {"transformer_layers": exported.config.num_layers, "files": sorted(os.listdir(run_a / "export"))}
    rep.update(run=run)

    # The resume: a copy of the run cut back to its step-2 checkpoint continues to the same losses.
    shutil.copytree(run_a, run_b, ignore=shutil.ignore_patterns("export", "samples"))
    for p in (run_b / "checkpoints").glob("step_*"):
        if p.name != "step_00000002":
            shutil.rmtree(p)
    (run_b / "checkpoints" / "latest").write_text("step_00000002\n")
    rc, sec = launch(rep, [*common, f"output.run_dir={run_b}", "--resume"], work / "resumed.console.txt", env_extra)
    resumed = {r["step"]: r for r in read_rows(run_b)}
    ref = {r["step"]: r for r in rows}
    diffs, exact = {}, True
    for step in range(3, steps + 1):
        for k in COMPARED:
            a, b = ref.get(step, {}).get(k), resumed.get(step, {}).get(k)
            if a is None and b is None:
                continue
            if a is None or b is None:
                exact = False
                diffs[f"{step}:{k}"] = "missing"
                continue
            exact &= a == b
            diffs[f"{step}:{k}"] = abs(a - b) / max(abs(a), 1e-12)
    worst = max((v for v in diffs.values() if isinstance(v, float)), default=0.0)
    missing = [k for k, v in diffs.items() if v == "missing"]
    # fp32 on the CPU: bit-identical (as tests/test_train_launch.py holds it); bf16 on a GPU may differ
    # by the order of its atomics, so 1e-3 relative.
    tol = 1e-5 if mode.device == "cpu" else 1e-3
    ok = rc == 0 and not missing and worst <= tol
    rep.update(
        resume={
            "exit_code": rc,
            "seconds": sec,
            "from": "step_00000002",
            "steps_compared": list(range(3, steps + 1)),
            "bit_identical": exact,
            "max_rel_diff": worst,
            "tolerance": tol,
            "missing": missing,
            "reproduces": ok,
            **({"console_tail": _file_tail(work / "resumed.console.txt")} if rc != 0 else {}),
        }
    )
    good = (
        finite
        and ok
        and ckpts == [f"step_{s:08d}" for s in range(2, steps + 1, 2)] + ([f"step_{steps:08d}"] if steps % 2 else [])
    )
    if mode.device == "cuda":
        good &= "cuda" in state["rng"]
    rep.update(status="ok" if good else "failed")


# ============================================================================ part c: the paper's iteration


def write_random_models(out: Path, arch: str, raft_arch: str) -> dict:
    """Full-size (or tiny) random networks through the real save path: the folders a run loads.

    <out>/wan/transformer (WanTransformer3DModel.save_pretrained, bf16: half the bytes to write and
    read; loading casts as for an fp32 file), <out>/wan/vae (AutoencoderKLWan, fp32), <out>/<raft>.pth.
    No text encoder: the trainer reads prompt embeddings, and the architecture comes from the preset.
    Built on the CPU (~15 s at 1.3B): this process holds no CUDA context while the trainer runs.
    """
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from mogan_ds.models.builders import build_raft
    from mogan_ds.models.presets import PRESETS

    preset, sizes = PRESETS[arch], {}
    torch.manual_seed(0)
    net = WanTransformer3DModel(**preset["transformer"])
    sizes["transformer_params"] = sum(p.numel() for p in net.parameters())
    net.to(torch.bfloat16).save_pretrained(out / "wan" / "transformer")
    del net
    vae = AutoencoderKLWan(**preset["vae"])
    sizes["vae_params"] = sum(p.numel() for p in vae.parameters())
    vae.save_pretrained(out / "wan" / "vae")
    del vae
    torch.save(build_raft(raft_arch).state_dict(), out / f"{raft_arch}.pth")
    sizes["bytes_written"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return sizes


def write_random_prompts(
    out: Path, num: int, max_length: int, dim: int, negative_prompt: str, disc_prompt: str, seed: int = 0
) -> dict:
    """A prompt-embedding folder (mogan_ds/data/prompts.py's layout) of random N(0, 1) embeddings.

    Each prompt's true length is drawn in [max_length/8, max_length/2] (Wan's prompts are tens to
    a few hundred tokens); the loader pads to max_length, so the DiT computes on [max_length, dim]
    whatever the length.
    """
    import io

    import numpy as np

    from mogan_ds.data.shard_build import write_tar_atomic

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)

    def emb():
        n = int(rng.integers(max(1, max_length // 8), max(2, max_length // 2) + 1))
        return rng.standard_normal((n, dim), dtype=np.float32)

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

    special = io.BytesIO()
    np.savez(special, negative=emb(), disc=emb())
    (out / "special.npz").write_bytes(special.getvalue())
    samples = [{"__key__": f"{i:08d}", "npy": npy(emb()), "txt": f"random prompt {i}".encode()} for i in range(num)]
    write_tar_atomic(str(out / "prompts-000000.tar"), samples)
    meta = {
        "num_prompts": num,
        "max_length": max_length,
        "dim": dim,
        "shards": ["prompts-000000.tar"],
        "special": "special.npz",
        "negative_prompt": negative_prompt,
        "disc_prompt": disc_prompt,
        "truncated_prompts": 0,
        "identity": {"random": True, "seed": seed},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def compare(rows: list[dict], plan: dict | None, ceiling_tflops: float | None, warmup: int = 1) -> dict:
    """Measured (metrics rows after the warm-up) beside planned, per phase and for the iteration."""
    timed = rows[warmup:]
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
            "time_s": _r(sec),
            "peak_alloc_gib": _r(alloc) if alloc is not None else "n/a",
            "peak_reserved_gib": _r(reserved) if reserved is not None else "n/a",
        }
        if plan:
            planned_peak = states + plan["phase_act_peak_bytes"][ph] / GIB
            flops = plan["phase_flops"][ph]
            row |= {
                "planned_peak_gib": _r(planned_peak),
                "measured_over_planned_peak": _r(alloc / planned_peak) if alloc is not None else "n/a",
                "planned_tflop": _r(flops / 1e12),
                "achieved_tflops": _r(flops / sec / 1e12) if sec else None,
                "planned_s_at_assumed_mfu": _r(flops / (plan["bf16_dense_flops"] * plan["mfu_assumed"])),
            }
        out["phases"][ph] = row
    step_s = mean(r.get("step_time") for r in timed)
    phase_s = mean(sum(r.get(f"time_{ph}", 0.0) for ph in phases) for r in timed)
    allocs = [v["peak_alloc_gib"] for v in out["phases"].values() if v["peak_alloc_gib"] != "n/a"]
    it = {
        "step_time_s": _r(step_s),
        "sum_of_phases_s": _r(phase_s),
        # the largest phase peak; the row's own peak_mem_gib is since the last reset of the statistics
        "peak_alloc_gib": max(allocs) if allocs else "n/a",
        "peak_mem_gib_row": _r(max((r.get("peak_mem_gib") or 0) for r in timed)),
        "nonfinite_total": timed[-1].get("nonfinite_total"),
        "ceiling_tflops": ceiling_tflops,
    }
    if plan and step_s:
        achieved = plan["iteration_flops"] / step_s / 1e12
        it |= {
            "planned_tflop": _r(plan["iteration_flops"] / 1e12),
            "planned_s": _r(plan["est_iteration_s"]),
            "planned_mfu": plan["mfu_assumed"],
            "measured_over_planned_s": _r(step_s / plan["est_iteration_s"]) if plan["est_iteration_s"] else None,
            "achieved_tflops": _r(achieved),
            "mfu_vs_datasheet": _r(achieved / DATASHEET_BF16_TFLOPS),
            "mfu_vs_measured_ceiling": _r(achieved / ceiling_tflops) if ceiling_tflops else "n/a",
            "planned_peak_gib": _r(plan["peak_bytes"] / GIB),
            "planned_model_states_gib": _r(plan["model_state_bytes"] / GIB),
            "planned_fits": plan["fits"],
        }
    out["iteration"] = it
    return out


def part_c(rep: Report, mode: Mode, args) -> None:
    import torch  # noqa: F401 - imported before the writers so a broken install fails here, named

    from mogan_ds.config import load_config
    from mogan_ds.models.presets import PRESETS

    work = Path(args.work) / "c"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    deadline = time.monotonic() + args.part_limit
    cfg = load_config(mode.paper_recipe, [])
    a_env = _read_json(Path(args.out) / f"{PART_NAMES['a']}.json") or {}
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
                    [sys.executable, __file__, "--compute-plan", name, "--plan-out", str(f)],
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
        rep.update(status="failed", error="synthetic shards", output=_tail(shards_out))
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
    ]
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
            lambda rows, plan=plans[plan_name]["plan"]: compare(rows, plan, ceiling),
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
        att["comparison"] = compare(res.get("rows", []), plan, ceiling)
        rep.data.pop("current", None)
        rep.update(attempts=results)
        if res["status"] != "oom" or deadline - time.monotonic() < 120:
            break
        att["next"] = "repeated with the planner's memory levers"
    last = results[-1]
    timed = len(last.get("rows", [])) - 1
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
                text = _file_tail(console, 400_000) + _file_tail(run_dir / "logs" / "rank_00000.log", 400_000)
                phase = oom_phase(text)
                res |= {"exit_code": rc, "status": "oom" if phase else "failed"}
                if phase:
                    res |= {"oom_phase": phase, "oom_message": oom_message(text)}
                res["console_tail"] = _file_tail(console)
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
                res["console_tail"] = _file_tail(console)
                break
            time.sleep(1.0)
    finally:
        _kill_group(proc.pid, proc=proc)  # stops the run; after its own exit, what its group left (loader workers)
        fh.close()
        rep.data.pop("launcher_pgid", None)  # stopped: nothing left for the orchestrator to stop
    res["seconds"] = round(time.monotonic() - t0, 1)
    res.update(trainer_facts(run_dir, console))
    return res


# ============================================================================ orchestration

PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}


def run_part(args) -> int:
    mode = Mode(args.cpu_smoke)
    rep = Report(Path(args.out), args.part)
    try:
        PARTS[args.part](rep, mode, args)
    except BaseException as e:
        import traceback

        rep.update(
            status="crashed", error=f"{type(e).__name__}: {str(e)[:1000]}", traceback=_tail(traceback.format_exc())
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
    builder = None
    (work / FUSED_ADAM_RESULT).unlink(missing_ok=True)
    if not mode.cpu_smoke and "b" in parts:
        # FusedAdam's JIT build (CPU: nvcc, ninja) runs while parts a and d use the GPU; b waits for it.
        builder = subprocess.Popen(
            [sys.executable, __file__, "--build-fused-adam", "--work", str(work)],
            cwd=REPO,
            env=env,
            stdout=open(work / "fused_adam.log", "w"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=_watch_builder, args=(builder, work), daemon=True).start()
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
                    _kill_group(proc.pid, proc=proc)
                data = _read_json(path) or {"check": PART_NAMES[part], "status": "crashed", "error": "no JSON written"}
                pgid = data.pop("launcher_pgid", None)  # present only if the part died while its launcher ran
                if pgid:
                    _kill_group(int(pgid), grace=5)
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
    if builder is not None and builder.poll() is None:
        _kill_group(builder.pid, grace=5, proc=builder)
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
    ap.add_argument("--write-plans", action="store_true", help=f"recompute {PLANS_FILE.name} and exit")
    ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--part-limit", type=float, default=600, help=argparse.SUPPRESS)
    ap.add_argument("--compute-plan", choices=sorted(PLAN_SPECS), help=argparse.SUPPRESS)
    ap.add_argument("--build-fused-adam", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--plan-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_plans:
        return write_plans()
    if args.build_fused_adam:
        return build_fused_adam(Path(args.work))
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
