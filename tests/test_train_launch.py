"""Two CPU ranks through the real `deepspeed` launcher: an end-to-end run asserting on its
outputs, and a run killed mid-way then resumed that must reproduce the uninterrupted run."""

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mogan_ds.cli.launcher import REPO, deepspeed_command, launch_env
from mogan_ds.parallel.ranks import free_port
from mogan_ds.train.metrics import read_metrics

pytestmark = pytest.mark.slow

DS_CPU = str(REPO / "ds_configs" / "zero3_cpu.json")
STEPS = 4
COMPARED = (
    "dmd_loss",
    "dmd_grad_norm",
    "fake_score_loss",
    "g_gan_loss",
    "d_loss",
    "d_real_logit",
    "d_fake_logit",
    "r1_gap",
    "r2_gap",
)


def train_args(tiny_workdir, run_dir, *extra):
    return [
        "--ds_config",
        DS_CPU,
        "--config",
        "tiny",
        *tiny_workdir,
        f"output.run_dir={run_dir}",
        f"train.max_steps={STEPS}",
        "output.checkpoint_every=2",
        "train.batch_size=2",
        "dmd.critic_updates=1",
        f"logging.sample_every={STEPS}",
        "logging.wandb_mode=disabled",
        "data.num_workers=1",
        "train.ema_decay=0.9",
        *extra,
    ]


def launch(args, master_port=None, **kw):
    return subprocess.run(
        deepspeed_command(2, REPO / "launch" / "train.py", args, master_port=master_port),
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=900,
        **kw,
    )


def check(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def uninterrupted_run(tiny_workdir, tmp_path_factory):
    """The reference run (`STEPS` steps), made once per test session and shared with
    tests/test_preemption.py (cached under the base temp directory, `DONE` written last)."""
    run = tmp_path_factory.getbasetemp() / "uninterrupted"
    if not (run.parent / f"{run.name}.DONE").is_file():
        shutil.rmtree(run, ignore_errors=True)  # an attempt that failed earlier in this session
        port = free_port()
        proc = launch(train_args(tiny_workdir, run), master_port=port)
        check(proc)
        (run.parent / f"{run.name}.console.txt").write_text(proc.stdout + proc.stderr)
        (run.parent / f"{run.name}.port").write_text(str(port))
        (run.parent / f"{run.name}.DONE").write_text("")
    return run


@pytest.fixture(scope="module")
def uninterrupted(tiny_workdir, tmp_path_factory):
    return uninterrupted_run(tiny_workdir, tmp_path_factory)


def test_console_is_one_summary_and_the_rest_goes_to_the_log_files(uninterrupted):
    """Two ranks print one set-up summary (rank 0), no per-module/per-rank set-up lines and no
    library deprecations; every rank's full record is in <run_dir>/logs/rank_N.log."""
    console = (uninterrupted.parent / f"{uninterrupted.name}.console.txt").read_text()
    assert console.count("world 2 = dp 2 x sp 1") == 1 and "effective gradient-penalty weights" in console
    for noise in (
        "attention backend of",
        "Attention backends are an experimental",
        "FutureWarning",
        "should be kept in float32",
    ):
        assert noise not in console, noise
    logs = sorted(p.name for p in (uninterrupted / "logs").glob("rank_*.log"))
    assert logs == ["rank_00000.log", "rank_00001.log"]
    rank0 = (uninterrupted / "logs" / "rank_00000.log").read_text()
    assert "world 2 = dp 2 x sp 1" in rank0 and "checkpoint" in rank0
    assert "world 2 = dp 2 x sp 1" not in (uninterrupted / "logs" / "rank_00001.log").read_text()


def test_two_rank_run_leaves_its_outputs(uninterrupted):
    rows = read_metrics(uninterrupted)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:  # all four phases ran every step, with finite losses
        for k in COMPARED + ("time_generator_dmd", "time_fake_score", "time_generator_gan", "time_discriminator"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["step"], k, r.get(k))
        assert r["lr_generator"] > 0 and r["samples_per_s"] > 0 and r["peak_mem_gib"] > 0
    ckpts = sorted(p.name for p in (uninterrupted / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000004"]
    for role in ("generator", "fake_score", "discriminator"):
        assert (uninterrupted / "checkpoints" / "step_00000004" / role).is_dir()
    assert len(list((uninterrupted / "checkpoints" / "step_00000004" / "trainer").glob("rank_*.pt"))) == 2
    from mogan_ds.data.video import probe_video

    sample = uninterrupted / "samples" / f"step_{STEPS:08d}_0.mp4"
    info = probe_video(sample)
    assert info.width == 2 * 128 and info.height == 128  # [video | flow] side by side
    assert (uninterrupted / "config.yaml").is_file()
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(uninterrupted / "export")
    assert pipe.transformer.config.num_layers == 4


def test_run_leaves_no_shared_memory_behind(uninterrupted):
    """DeepSpeed's CPU all-reduce buffers (~66 MB per rank in /dev/shm) are unlinked once mapped."""
    port = (uninterrupted.parent / f"{uninterrupted.name}.port").read_text()
    left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, left


def test_killed_run_resumes_to_the_same_losses(uninterrupted, tiny_workdir, tmp_path):
    run = tmp_path / "killed"
    cmd = deepspeed_command(2, REPO / "launch" / "train.py", train_args(tiny_workdir, run))
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=launch_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and any(
                json.loads(line)["step"] >= 3 for line in metrics.read_text().splitlines() if line
            ):
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"run ended before it could be killed:\n{proc.stderr.read()[-4000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-step
        proc.wait()
    from mogan_ds.checkpoint.manager import CheckpointManager

    assert CheckpointManager(run).latest().name == "step_00000002"
    check(launch(train_args(tiny_workdir, run, "--resume")))
    resumed = {r["step"]: r for r in read_metrics(run)}
    reference = {r["step"]: r for r in read_metrics(uninterrupted)}
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in (3, 4):
        for k in COMPARED:
            assert resumed[step][k] == pytest.approx(reference[step][k], rel=1e-5, abs=1e-7), (step, k)
    # the EMA was saved at step 2, restored, and carried on to the same values
    import torch

    for rank in (0, 1):
        a, b = (
            torch.load(r / "checkpoints" / "step_00000004" / "trainer" / f"rank_0000{rank}.pt", weights_only=False)[
                "ema"
            ]
            for r in (run, uninterrupted)
        )
        assert len(a["shadow"]) == len(b["shadow"]) > 0
        assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a["shadow"], b["shadow"]))
