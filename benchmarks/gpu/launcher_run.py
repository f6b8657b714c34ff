"""The real launcher (runs, their metrics rows and logs) and part b: the tiny recipe end to end, resumed."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from .common import REPO, Mode, Report, file_tail, kill_group, read_json, tail

# Loss keys a resumed run must reproduce (as tests/test_train_launch.py compares them).
COMPARED = ("dmd_loss", "dmd_grad_norm", "fake_score_loss", "g_gan_loss", "d_loss", "d_real_logit", "d_fake_logit")
# Trainer methods whose name in a traceback says which phase ran out of memory.
PHASE_METHODS = {
    "generator_dmd_gan_update": "generator_dmd_gan",
    "generator_dmd_update": "generator_dmd",
    "fake_score_update": "fake_score",
    "generator_gan_update": "generator_gan",
    "discriminator_update": "discriminator",
}


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
        kill_group(proc.pid, grace=5, proc=proc)  # what is left of its group (a loader worker), if anything
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
    text = file_tail(console, 200_000) + file_tail(run_dir / "logs" / "rank_00000.log", 2_000_000)
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


# Part b: DeepSpeed's FusedAdam built in the background meanwhile, then the tiny recipe end to end, resumed.

FUSED_ADAM_RESULT = "fused_adam.json"  # in --work: written by the background build (build_fused_adam)
FUSED_ADAM_WAIT_S = 150  # how long part b waits for it (it starts with part a, on the CPUs the GPU parts leave idle)


def build_fused_adam(work: Path) -> int:
    """DeepSpeed's FusedAdam, JIT-compiled as the trainer would (nvcc + ninja, TORCH_EXTENSIONS_DIR);
    the outcome goes to <work>/fused_adam.json. The orchestrator starts it beside parts a and d."""
    t0 = time.monotonic()
    image_arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    try:
        from deepspeed.accelerator import get_accelerator

        from mogan_ds.train.op_builds import deepspeed_arch_list

        arch_note = deepspeed_arch_list()  # as the trainer does before building its engines
        get_accelerator().create_op_builder("FusedAdamBuilder").load()
        result = {"built": True, "arch_note": arch_note}
    except BaseException as e:  # noqa: BLE001 - the failure is the finding; b falls back on it
        result = {"built": False, "error": f"{type(e).__name__}: {tail(str(e), 1500)}"}
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["arch_list_env"] = image_arch_list  # TORCH_CUDA_ARCH_LIST as the machine set it
    _write_result(work / FUSED_ADAM_RESULT, result)
    return 0 if result["built"] else 1


TINY_RESULT = "tiny.json"  # in --work: the tiny workdir's overrides, written by prepare_tiny (in the background)
TINY_WAIT_S = 150


def prepare_tiny(work: Path) -> int:
    """Part b's tiny models, shards and prompts (~70 s of CPU on the GPU machine, mostly imports and
    subprocesses), prepared while parts a and d use the GPU; the overrides go to <work>/tiny.json."""
    t0 = time.monotonic()
    try:
        from mogan_ds.cli.demo import prepare_tiny_workdir, tiny_overrides

        result = {"overrides": tiny_overrides(prepare_tiny_workdir(work / "tiny", clips=12, frames=16))}
    except BaseException as e:  # noqa: BLE001 - b reports it
        result = {"error": f"{type(e).__name__}: {tail(str(e), 1500)}"}
    result["seconds"] = round(time.monotonic() - t0, 1)
    _write_result(work / TINY_RESULT, result)
    return 0 if "overrides" in result else 1


def _write_result(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def wait_result(path: Path, limit_s: float) -> tuple[dict | None, float]:
    """A background job's result file, waited for at most `limit_s`; (None, waited) if it never came."""
    t0 = time.monotonic()
    while not path.is_file() and time.monotonic() - t0 < limit_s:
        time.sleep(1.0)
    return read_json(path), round(time.monotonic() - t0, 1)


def watch_builder(proc: subprocess.Popen, result: Path, log_name: str) -> None:
    """If a background job dies without its result file (a crash), write one: b stops waiting."""
    rc = proc.wait()
    if not result.is_file():
        _write_result(result, {"built": False, "error": f"the background job exited with {rc} (see {log_name})"})


def part_b(rep: Report, mode: Mode, args) -> None:
    work = Path(args.work) / "b"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    if args.tiny:
        overrides = list(args.tiny)
    else:
        tiny = Path(args.work) / TINY_RESULT
        if not tiny.is_file() and not args.tiny_in_background:
            prepare_tiny(Path(args.work))
        made, waited = wait_result(tiny, TINY_WAIT_S)
        if not made or "overrides" not in made:
            rep.update(status="failed", error=f"the tiny workdir: {(made or {}).get('error', 'not made in time')}")
            return
        overrides = made["overrides"]
        rep.update(tiny_workdir={"seconds": made["seconds"], "waited_s": waited})
    rep.update(ds_config=mode.tiny_ds, tiny_workdir_s=round(time.monotonic() - t0, 1))

    env_extra, adam = {}, []
    if mode.device == "cuda":
        fused, waited = wait_result(Path(args.work) / FUSED_ADAM_RESULT, FUSED_ADAM_WAIT_S)
        fused = fused or {"built": False, "error": f"no result after {FUSED_ADAM_WAIT_S} s more"}
        fused["waited_s"] = waited
        if not fused["built"]:
            # The same maths; the fallback is stated here and used by part c too.
            (Path(args.work) / "torch_adamw").write_text(fused.get("error", ""))
            adam = ["optim.fused_adam=false"]
            fused["fallback"] = "torch AdamW (optim.fused_adam=false)"
            fused["log_tail"] = file_tail(Path(args.work) / "fused_adam.log", 2000)
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
        run["console_tail"] = file_tail(work / "run.console.txt")
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
    measured, missing, exact = {}, [], True  # measured: (step, key) -> relative difference
    for step in range(3, steps + 1):
        for k in COMPARED:
            a, b = ref.get(step, {}).get(k), resumed.get(step, {}).get(k)
            if a is None and b is None:
                continue
            if a is None or b is None:
                exact = False
                missing.append(f"{step}:{k}")
                continue
            exact &= a == b
            measured[step, k] = abs(a - b) / max(abs(a), 1e-12)
    worst = max(measured.values(), default=0.0)
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
            # the largest differences, key by key, with both values: which loss moved, and by how much
            "worst": [
                {"key": f"{step}:{k}", "rel_diff": v, "uninterrupted": ref[step][k], "resumed": resumed[step][k]}
                for (step, k), v in sorted(measured.items(), key=lambda kv: -kv[1])[:6]
            ],
            **({"console_tail": file_tail(work / "resumed.console.txt")} if rc != 0 else {}),
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
