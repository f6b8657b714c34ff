"""The per-role DeepSpeed dict and the training entry point's clear errors (no engines built)."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from mogan_ds.cli.launcher import REPO, launch_env
from mogan_ds.config import ConfigError, load_config
from mogan_ds.train.roles import ROLES, ds_config_for, gradient_accumulation_steps, load_ds_config, role_zero_stage


def topo(dp, sp=1):
    return SimpleNamespace(dp_size=dp, sp_size=sp)


def test_each_role_gets_its_own_optimiser_and_the_batch_arithmetic():
    cfg = load_config(
        "wan2.1-t2v-1.3b",
        [
            "optim.discriminator.lr=1e-5",
            "optim.discriminator.grad_clip=1",
            "optim.generator.warmup_steps=100",
            "train.batch_size=32",
            "train.micro_batch_size=2",
        ],
    )
    base = load_ds_config(REPO / "ds_configs" / "zero3_bf16.json")
    g = ds_config_for("generator", cfg, base, topo(8))
    d = ds_config_for("discriminator", cfg, base, topo(8))
    assert g["optimizer"]["type"] == "AdamW" and g["optimizer"]["params"]["lr"] == 2e-6
    assert g["optimizer"]["params"]["betas"] == [0.0, 0.999]
    assert d["optimizer"]["params"]["lr"] == 1e-5 and d["gradient_clipping"] == 1.0
    assert g["scheduler"]["params"]["warmup_num_steps"] == 100 and "scheduler" not in d
    assert (g["train_batch_size"], g["train_micro_batch_size_per_gpu"], g["gradient_accumulation_steps"]) == (32, 2, 2)
    assert g["bf16"] == {"enabled": True} and g["zero_optimization"]["stage"] == 3
    assert "optimizer" not in base  # the JSON itself is untouched
    # sequence parallelism: ZeRO-3 must reduce-scatter (mean over dp*sp), forced on
    g_sp = ds_config_for(
        "generator", cfg, {**base, "zero_optimization": {"stage": 3, "reduce_scatter": False}}, topo(4, 2)
    )
    assert g_sp["zero_optimization"]["reduce_scatter"] is True
    with pytest.raises(ValueError, match="stage"):
        ds_config_for("generator", cfg, {"zero_optimization": {"stage": 2}}, topo(4, 2))


def test_batch_that_does_not_divide_names_the_key():
    cfg = load_config("wan2.1-t2v-1.3b", ["train.batch_size=12"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        gradient_accumulation_steps(cfg, 8)


def test_ds_config_may_not_set_what_the_recipe_owns(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}, "train_batch_size": 8}))
    with pytest.raises(ConfigError, match="optimizer"):
        load_ds_config(p)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(p)
    with pytest.raises(ConfigError, match="no DeepSpeed JSON"):
        load_ds_config(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "tiny", "gan.windoww=2"], "gan.windoww"),
        (["--config", "no_such_recipe"], "no_such_recipe"),
        (
            [
                "--config",
                "tiny",
                "models.root=/nonexistent/wan",
                "data.prompts=/nonexistent/prompts",
                "models.arch=auto",
            ],
            "/nonexistent",
        ),
        (
            ["--config", "tiny", "parallel.sp_size=3", "gan.split_over_sp=false"],
            "4 attention heads",
        ),  # 3 does not divide 4 heads
        (["--config", "tiny", "gan.window=2", "parallel.sp_size=4"], "gan.window: a window of 2 latent chunks"),
    ],
)
def test_train_entry_point_fails_clearly(args, message, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "train.py"),
            "--ds_config",
            str(REPO / "ds_configs" / "zero3_cpu.json"),
            *args,
            f"output.run_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=launch_env(),
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr


def test_discriminator_batch_is_its_own():
    cfg = load_config("wan2.1-t2v-1.3b", ["train.batch_size=16", "gan.disc_batch_size=64"])
    base = load_ds_config(REPO / "ds_configs" / "zero3_bf16.json")
    g, d = ds_config_for("generator", cfg, base, topo(16)), ds_config_for("discriminator", cfg, base, topo(16))
    assert (g["train_batch_size"], g["gradient_accumulation_steps"]) == (16, 1)
    assert (d["train_batch_size"], d["gradient_accumulation_steps"]) == (64, 4)
    assert gradient_accumulation_steps(load_config("wan2.1-t2v-1.3b"), 16, "discriminator") == 1  # 0 = the generator's
    with pytest.raises(ConfigError, match="gan.disc_batch_size"):
        gradient_accumulation_steps(load_config("wan2.1-t2v-1.3b", ["gan.disc_batch_size=24"]), 16, "discriminator")
    with pytest.raises(ConfigError, match="gan.disc_batch_size"):
        load_config("wan2.1-t2v-1.3b", ["train.micro_batch_size=2", "gan.disc_batch_size=3", "train.batch_size=16"])


def test_per_role_zero_stage_overrides_the_json_stage():
    base = load_ds_config(REPO / "ds_configs" / "zero3_bf16.json")
    cfg = load_config("wan2.1-t2v-1.3b", ["parallel.zero_stage.generator=2", "parallel.zero_stage.fake_score=2"])
    stages = {r: ds_config_for(r, cfg, base, topo(16))["zero_optimization"]["stage"] for r in ROLES}
    assert stages == {"generator": 2, "fake_score": 2, "discriminator": 3}
    assert {r: role_zero_stage(r, cfg, base) for r in ROLES} == stages
    # the rest of the JSON's ZeRO settings are kept, and the JSON itself is untouched
    g = ds_config_for("generator", cfg, base, topo(16))["zero_optimization"]
    assert g["overlap_comm"] is True and g["reduce_bucket_size"] == base["zero_optimization"]["reduce_bucket_size"]
    assert base["zero_optimization"]["stage"] == 3
    # 0 = the JSON's stage
    assert ds_config_for("generator", load_config("wan2.1-t2v-1.3b"), base, topo(16))["zero_optimization"]["stage"] == 3
    # stage 2 cannot average gradients over an SP group, nor offload parameters: refused, naming the key
    with pytest.raises(ConfigError, match=r"parallel.zero_stage.generator=2 with parallel.sp_size=2"):
        ds_config_for("generator", cfg, base, topo(8, 2))
    offload_param = {**base, "zero_optimization": {**base["zero_optimization"], "offload_param": {"device": "cpu"}}}
    with pytest.raises(ConfigError, match="offload_param"):
        ds_config_for("fake_score", cfg, offload_param, topo(16))
    evaluating = load_config(
        "wan2.1-t2v-1.3b", ["parallel.zero_stage.generator=2", "eval.every=10", "train.ema_decay=0.99"]
    )
    with pytest.raises(ConfigError, match="eval.every"):
        ds_config_for("generator", evaluating, base, topo(16))
    with pytest.raises(ConfigError, match="parallel.zero_stage.discriminator"):
        load_config("wan2.1-t2v-1.3b", ["parallel.zero_stage.discriminator=4"])


@pytest.mark.slow
def test_zero2_generator_and_critic_train_like_zero3(tiny_workdir, tmp_path_factory, tmp_path):
    """The ZeRO-2 preset (parallel.zero_stage.{generator,fake_score}=2, D on the JSON's stage 3)
    trains the tiny recipe on 2 ranks like the all-ZeRO-3 reference run (tests/scale_runs.py)."""
    import torch
    from scale_runs import COMPARED, STEPS, check, reference_run, train_args

    from mogan_ds.checkpoint.consolidate import engine_dir, engine_fp32_state_dict
    from mogan_ds.cli.launcher import deepspeed_command
    from mogan_ds.train.metrics import read_metrics

    reference = reference_run(tiny_workdir, tmp_path_factory)
    run = tmp_path / "run"
    args = train_args(tiny_workdir, run, STEPS, "parallel.zero_stage.generator=2", "parallel.zero_stage.fake_score=2")
    check(
        subprocess.run(
            deepspeed_command(2, REPO / "launch" / "train.py", args),
            cwd=REPO,
            env=launch_env(),
            capture_output=True,
            text=True,
            timeout=1200,
        )
    )
    # The same losses (ZeRO-2 and ZeRO-3 reduce the same fp32 gradients in another order).
    ours, ref = read_metrics(run), read_metrics(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(ours, ref):
        for k in COMPARED:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    for step in range(1, STEPS + 1):
        ckpt = f"checkpoints/step_{step:08d}"
        for role, stage in (("generator", 2), ("fake_score", 2), ("discriminator", 3)):
            # the stage each engine really ran: DeepSpeed writes engine.zero_optimization_stage()
            # into every optimizer-state file of its checkpoint
            optim = sorted(engine_dir(run / ckpt, role).rglob("*optim_states.pt"))
            assert optim, role
            sd = torch.load(optim[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
            assert sd["zero_stage"] == stage, (role, sd["zero_stage"])
            # The fp32 masters after each optimizer step equal the ZeRO-3 run's within fp32 rounding
            # (measured: G and the fake score within 7e-7). D, at stage 3 in both runs, trains on
            # fakes of a generator that differs by that rounding (measured: within 1.9e-6).
            x, y = engine_fp32_state_dict(run / ckpt, role), engine_fp32_state_dict(reference / ckpt, role)
            assert x.keys() == y.keys()
            atol = 1e-6 if stage == 2 else 5e-6
            for k in x:
                torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=atol, msg=f"{role} {k} step {step}")
    assert (run / "export").is_dir()  # the EMA export at the end runs on a ZeRO-2 generator too


def test_teacher_engine_dict_is_zero3_inference_in_the_frozen_dtype():
    from mogan_ds.train.roles import teacher_ds_config, teacher_zero3

    cfg = load_config("wan2.1-t2v-14b", [])
    base = load_ds_config(REPO / "ds_configs" / "zero3_bf16_offload.json")
    t = teacher_ds_config(cfg, base, topo(16))
    # ZeRO-3, no optimizer / scheduler / clipping, the optimizer's offload dropped, the JSON's ZeRO knobs kept.
    assert teacher_zero3(cfg, base) and t["zero_optimization"]["stage"] == 3
    assert not {"optimizer", "scheduler", "gradient_clipping"} & t.keys()
    assert "offload_optimizer" not in t["zero_optimization"] and "offload_optimizer" in base["zero_optimization"]
    assert (
        t["zero_optimization"]["stage3_prefetch_bucket_size"]
        == base["zero_optimization"]["stage3_prefetch_bucket_size"]
    )
    # Batch sizes DeepSpeed accepts: those of the generator's DMD update (train 16 = micro 1 x gas 1 x dp 16).
    assert (t["train_batch_size"], t["train_micro_batch_size_per_gpu"], t["gradient_accumulation_steps"]) == (16, 1, 1)
    assert t["bf16"] == {"enabled": True} and "fp16" not in t
    # The precision follows models.frozen_dtype, not the JSON's training precision (both ways).
    fp32 = teacher_ds_config(load_config("wan2.1-t2v-14b", ["models.frozen_dtype=fp32"]), base, topo(16))
    assert "bf16" not in fp32 and "fp16" not in fp32
    cpu = load_ds_config(REPO / "ds_configs" / "zero3_cpu.json")
    assert "bf16" not in cpu and teacher_ds_config(cfg, cpu, topo(16))["bf16"] == {"enabled": True}
    # offload_param from the JSON is honoured.
    off = {**base, "zero_optimization": {**base["zero_optimization"], "offload_param": {"device": "cpu"}}}
    assert teacher_ds_config(cfg, off, topo(16))["zero_optimization"]["offload_param"] == {"device": "cpu"}
    # The teacher's stage: 0 follows the JSON (stage 2 JSON -> replica), 3 forces the engine, 1/2 a replica.
    z2 = {**base, "zero_optimization": {"stage": 2}}
    assert not teacher_zero3(cfg, z2)
    assert teacher_zero3(load_config("wan2.1-t2v-14b", ["parallel.zero_stage.teacher=3"]), z2)
    assert not teacher_zero3(load_config("wan2.1-t2v-14b", ["parallel.zero_stage.teacher=1"]), base)
    assert not teacher_zero3(load_config("wan2.1-t2v-14b", ["dmd.enabled=false"]), base)
    with pytest.raises(ConfigError, match="parallel.zero_stage.teacher"):
        teacher_ds_config(cfg, z2, topo(16))
    # Refused, naming the key: quantised frozen weights, NVMe-swapped partitions.
    for key, value in (
        ("zero_quantized_nontrainable_weights", True),
        ("zero_quantized_weights", True),
        ("offload_param", {"device": "nvme", "nvme_path": "/x"}),
    ):
        bad = {**base, "zero_optimization": {**base["zero_optimization"], key: value}}
        with pytest.raises(ConfigError, match=f"zero_optimization.{key}"):
            teacher_ds_config(cfg, bad, topo(16))
    assert "optimizer" not in base and base["bf16"] == {"enabled": True}  # the JSON itself is untouched
