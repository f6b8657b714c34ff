"""LoRA through the real launcher: 2 CPU ranks at dp 1 x sp 2 (Ulysses on the adapted networks, ZeRO-3
over both ranks), every role a LoRA adapter, the fake score on the teacher's shared base.

Checkpoints hold the adapters (and D's heads) with their optimizer states, not the frozen
bases; a run resumed from step 1 on the same layout reproduces step 2's losses and EMA; the
step-1 checkpoint resumed on another layout (one rank, dp 1 x sp 1) restores the adapters'
masters, Adam moments and EMA exactly and step 2 reproduces the losses (to float rounding of
the other attention split); `python -m mogan_ds export` merges the adapter into the base
(base + B A * alpha / r, equal to the trainer's export) and writes it alone in peft's format.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from scale_runs import DS_CPU, assert_restored_from, check, overrides, train_args

from mogan_ds.cli.launcher import REPO, deepspeed_command, launch_env
from mogan_ds.models.lora import is_adapter_param

pytestmark = pytest.mark.slow
RANK, ALPHA = 4, 8.0
LORA = [
    f"models.lora.{r}.{k}={v}"
    for r in ("generator", "fake_score", "discriminator")
    for k, v in (("enabled", "true"), ("rank", RANK), ("alpha", ALPHA))
]
EXTRA = (*LORA, "parallel.sp_size=2")
COMPARED = ("dmd_loss", "dmd_grad_norm", "fake_score_loss", "g_gan_loss", "d_loss", "r1_gap", "r2_gap")
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


def launch(tiny_workdir, run, *extra):
    cmd = deepspeed_command(2, REPO / "launch" / "train.py", train_args(tiny_workdir, run, 2, *EXTRA, *extra))
    check(subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=1500))


def metrics(run) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def ref(tiny_workdir, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora_launch") / "run"
    launch(tiny_workdir, run)
    return run


def from_step_1(ref, dst):
    """A copy of the run as it stood after step 1."""
    shutil.copytree(ref, dst, ignore=shutil.ignore_patterns("export", "step_00000002"))
    (dst / "checkpoints" / "latest").write_text("step_00000001\n")
    rows = (dst / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text(rows[0] + "\n")
    return dst


def test_checkpoints_hold_the_adapters_not_the_bases(ref):
    from mogan_ds.checkpoint.consolidate import engine_fp32_state_dict

    ckpt = ref / "checkpoints" / "step_00000002"
    base = load_file(_generator_file(ref))
    for role in ("generator", "fake_score", "discriminator"):
        state = engine_fp32_state_dict(ckpt, role)  # zero_to_fp32 of the two ranks' partitions
        params = {k for k in state if is_adapter_param(k) or k.startswith(("heads.", "final."))}
        assert params and all(is_adapter_param(k) for k in params if not k.startswith(("heads.", "final."))), role
        for f in (ckpt / role / "state").glob("*model_states.pt"):
            saved = torch.load(f, map_location="cpu", weights_only=False)
            assert saved["frozen_param_fragments"] is None  # the frozen base is rebuilt, never saved
        if role != "discriminator":
            assert {k for k in state if k.endswith(".weight") and not is_adapter_param(k)} == set(), role
            adapter_bytes = sum(v.numel() * 4 for k, v in state.items() if is_adapter_param(k))
            assert adapter_bytes < 0.1 * sum(v.numel() * 4 for v in base.values()), role


def _cfg(run):
    from mogan_ds.checkpoint.consolidate import run_config

    return run_config(run)


def _generator_file(run) -> str:
    from mogan_ds.checkpoint.consolidate import generator_folder

    return str(generator_folder(_cfg(run)) / "diffusion_pytorch_model.safetensors")


def test_resumed_lora_run_reproduces_the_losses(ref, tiny_workdir, tmp_path):
    run = from_step_1(ref, tmp_path / "resumed")
    launch(tiny_workdir, run, "--resume")
    got, want = metrics(run)[2], metrics(ref)[2]
    for k in COMPARED:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    for rank in (0, 1):
        a, b = (
            torch.load(r / "checkpoints" / "step_00000002" / "trainer" / f"rank_0000{rank}.pt", weights_only=False)[
                "ema"
            ]["shadow"]
            for r in (run, ref)
        )
        assert len(a) == len(b) > 0 and all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a, b))


def test_resumed_on_another_layout_restores_the_adapters_and_reproduces_the_losses(ref, tiny_workdir, tmp_path):
    from mogan_ds.checkpoint.consolidate import full_ema, generator_config, trainable_order, trainer_states
    from mogan_ds.config import load_config
    from mogan_ds.train.trainer import MoGANTrainer

    run = from_step_1(ref, tmp_path / "reshaped")
    ckpt = run / "checkpoints" / "step_00000001"
    cfg = load_config("tiny", overrides(tiny_workdir, run, 2, *LORA))  # sp 1 on one rank
    trainer = MoGANTrainer(cfg, DS_CPU, resume=True)
    assert (trainer.topo.dp_size, trainer.topo.sp_size, trainer.step) == (1, 1, 1)
    for role, engine in trainer.engines.items():
        trained = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
        assert_restored_from(ckpt, role, engine, trained)
    order = trainable_order(generator_config(trainer.cfg), trainer.cfg.models.lora.generator)
    ema = full_ema(trainer_states(ckpt), order)
    assert [n for n, _ in order] == [
        n for n, p in trainer.engines.generator.module.named_parameters() if p.requires_grad
    ]
    assert all(torch.equal(s.reshape(-1), ema[n].reshape(-1)) for (n, _), s in zip(order, trainer.ema.shadow))
    trainer.fit()  # step 2 on one rank without SP
    got, want = metrics(run)[2], metrics(ref)[2]
    for k in COMPARED:  # the same data and draws; only the attention's split over ranks differs
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k


def test_export_merges_the_adapter_and_writes_it_alone(ref, tmp_path):
    from peft import PeftModel

    from mogan_ds.__main__ import main
    from mogan_ds.checkpoint.consolidate import engine_fp32_state_dict, generator_folder
    from mogan_ds.models.builders import load_transformer

    cfg = _cfg(ref)
    base = load_file(_generator_file(ref))
    ckpt = ref / "checkpoints" / "step_00000002"
    adapters = engine_fp32_state_dict(ckpt, "generator")
    out = tmp_path / "merged"
    assert main(["export", "--run-dir", str(ref), "--out", str(out)]) == 0
    merged = load_file(str(out / TRANSFORMER))
    assert merged.keys() == base.keys()
    n = 0
    for key, w in base.items():
        layer = key.removesuffix(".weight")
        a = adapters.get(f"{layer}.lora_A.default.weight")
        if a is None:
            assert torch.equal(merged[key], w), key
            continue
        b = adapters[f"{layer}.lora_B.default.weight"]
        assert b.abs().sum() > 0
        assert torch.equal(merged[key], w + (b @ a) * (ALPHA / RANK)), key
        n += 1
    assert n == 4 * 10
    # --ema: the trainer's own export at the end of the run, byte for byte
    ema_out = tmp_path / "ema"
    assert main(["export", "--run-dir", str(ref), "--ema", "--out", str(ema_out)]) == 0
    assert (ema_out / TRANSFORMER).read_bytes() == (ref / "export" / TRANSFORMER).read_bytes()
    # --adapter-only: peft's format alone; PeftModel on the base merges to the same transformer
    alone = tmp_path / "adapter"
    assert main(["export", "--run-dir", str(ref), "--adapter-only", "--out", str(alone)]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors"} <= {
        p.name for p in alone.iterdir()
    }
    peft_model = PeftModel.from_pretrained(load_transformer(generator_folder(cfg)), str(alone))
    for k, v in peft_model.merge_and_unload().state_dict().items():
        torch.testing.assert_close(v, merged[k], rtol=1e-6, atol=1e-7, msg=k)
