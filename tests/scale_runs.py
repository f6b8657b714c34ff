"""One 2-rank tiny training run shared by the export, reshape-resume and multi-node tests.

Launcher runs cost minutes on the shared 2-core machine, so the reference run is made
once per test session (cached under pytest's base temp directory, a `DONE` marker
written last) and every module that needs it asks `reference_run`.
"""

from __future__ import annotations

import subprocess

from mogan_ds.cli.launcher import REPO, deepspeed_command, launch_env

DS_CPU = str(REPO / "ds_configs" / "zero3_cpu.json")
STEPS = 2
COMPARED = ("dmd_loss", "dmd_grad_norm", "fake_score_loss", "g_gan_loss", "d_loss", "r1_gap", "r2_gap")


def overrides(tiny_workdir, run_dir, steps: int = STEPS, *extra) -> list[str]:
    return [
        *tiny_workdir,
        f"output.run_dir={run_dir}",
        f"train.max_steps={steps}",
        "output.checkpoint_every=1",
        "output.keep_checkpoints=2",
        "train.batch_size=2",
        "dmd.critic_updates=1",
        "logging.sample_every=0",
        "logging.wandb_mode=disabled",
        "data.num_workers=0",
        "train.ema_decay=0.9",
        *extra,
    ]


def train_args(tiny_workdir, run_dir, steps: int = STEPS, *extra) -> list[str]:
    return ["--ds_config", DS_CPU, "--config", "tiny", *overrides(tiny_workdir, run_dir, steps, *extra)]


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def reference_run(tiny_workdir, tmp_path_factory):
    """2 ranks on one node, `STEPS` steps, a checkpoint after every step and the EMA export at the end."""
    run = tmp_path_factory.getbasetemp() / "scale_reference_run"
    if not (run / "DONE").is_file():
        check(
            subprocess.run(
                deepspeed_command(2, REPO / "launch" / "train.py", train_args(tiny_workdir, run)),
                cwd=REPO,
                env=launch_env(),
                capture_output=True,
                text=True,
                timeout=1200,
            )
        )
        (run / "DONE").write_text("")
    return run


def assert_restored_from(ckpt, role: str, engine, params: dict) -> None:
    """`engine` (resumed from `ckpt`) holds the checkpoint's fp32 masters (zero_to_fp32 of its partitions)
    and full Adam moments (DeepSpeed's universal conversion of the same checkpoint) for each of `params`."""
    import torch
    from deepspeed.utils import safe_get_full_optimizer_state

    from mogan_ds.checkpoint.consolidate import engine_fp32_state_dict
    from mogan_ds.checkpoint.export import full_fp32_state_dict

    saved = engine_fp32_state_dict(ckpt, role)
    live = full_fp32_state_dict(engine.module)  # this rank's fp32 masters
    assert params.keys() <= saved.keys()
    for name, p in params.items():
        assert torch.equal(live[name], saved[name]), (role, name)
        for key in ("exp_avg", "exp_avg_sq"):
            uni = torch.load(ckpt / "universal" / role / "state" / "zero" / name / f"{key}.pt", weights_only=False)
            uni = uni["param"] if isinstance(uni, dict) else uni
            assert torch.equal(safe_get_full_optimizer_state(p, key), uni.view(p.ds_shape)), (role, name)
