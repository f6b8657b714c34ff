"""Part a: the environment (versions, tools, the attention backend) and the measured matmul ceiling."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from .common import GIB, Mode, Report, round_sig, sync


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
    sync(mode.device)
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
            "tflops": round_sig(2 * n**3 * reps / seconds / 1e12),
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
