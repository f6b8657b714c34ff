"""Start a script under DeepSpeed's own launcher on this machine (demo, tests, benchmarks).

The same `deepspeed` command a cluster run uses; here with `--num_gpus N` local ranks.
Without an accelerator DeepSpeed picks its CPU accelerator and gloo by itself.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ..parallel.ranks import free_port

REPO = Path(__file__).resolve().parents[2]


def deepspeed_command(num_ranks: int, script: str | Path, args: list[str], master_port: int | None = None) -> list[str]:
    local = Path(sys.executable).with_name("deepspeed")  # the launcher of this environment first
    exe = str(local) if local.exists() else shutil.which("deepspeed")
    if not exe:
        raise FileNotFoundError("the deepspeed launcher is neither next to this python nor on PATH")
    return [exe, "--num_gpus", str(num_ranks), "--master_port", str(master_port or free_port()), str(script), *args]


#: Rendezvous variables a started job must not inherit: a parent that initialised its own
#: process group (an in-process trainer test, a notebook) still holds MASTER_PORT, and a child
#: reusing it fails with EADDRINUSE.
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch_env(extra: dict | None = None) -> dict:
    """The environment of a job started from this process: its own rendezvous, passive OpenMP."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    # One intra-op thread per rank: the ranks share the machine's cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    # ...and idle OpenMP threads sleep instead of spinning on the shared cores.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.update(extra or {})
    return env
