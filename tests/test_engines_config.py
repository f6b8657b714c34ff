"""The per-role DeepSpeed dict and the training entry point's clear errors (no engines built)."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from mogan_ds.config import ConfigError, load_config
from mogan_ds.engines import ds_config_for, gradient_accumulation_steps, load_ds_config
from mogan_ds.launcher import REPO, launch_env


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
        (["--config", "tiny", "parallel.sp_size=3"], "parallel.sp_size"),  # 3 does not divide the tiny DiT's 4 heads
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
