"""Resume onto another cluster shape: the 2-rank reference run's checkpoint (dp 2) resumed in this
process on one rank (dp 1). Weights, fp32 masters, Adam moments and the EMA equal the saved ones
exactly; the trainer's own exports (EMA and raw) at that step equal the offline CLI's; more steps run."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from scale_runs import DS_CPU, assert_restored_from, overrides, reference_run

pytestmark = pytest.mark.slow
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def resumed(tiny_workdir, tmp_path_factory):
    """The reference run as it stood after step 1 (dp 2), resumed on a world of one."""
    from mogan_ds.config import load_config
    from mogan_ds.train.trainer import MoGANTrainer

    src = reference_run(tiny_workdir, tmp_path_factory)
    run = tmp_path_factory.mktemp("reshaped") / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("export", "step_00000002", "DONE"))
    (run / "checkpoints" / "latest").write_text("step_00000001\n")
    cfg = load_config("tiny", overrides(tiny_workdir, run, 2))
    return MoGANTrainer(cfg, DS_CPU, resume=True), run / "checkpoints" / "step_00000001"


def test_layouts_differ(resumed):
    from mogan_ds.checkpoint.reshard import saved_layout

    trainer, ckpt = resumed
    assert saved_layout(ckpt) == {"dp": 2, "sp": 1}
    assert (trainer.topo.dp_size, trainer.topo.sp_size) == (1, 1) and trainer.step == 1


def test_weights_masters_and_moments_equal_the_saved_ones(resumed):
    from deepspeed.utils import safe_get_full_optimizer_state

    trainer, ckpt = resumed
    for role, engine in trainer.engines.items():
        params = dict(engine.module.named_parameters())
        assert len(params) > 10
        assert_restored_from(ckpt, role, engine, params)  # from the 2-rank partitions
        # one Adam step was taken: the moments are not a fresh optimizer's zeros
        assert any(safe_get_full_optimizer_state(p, "exp_avg_sq").abs().sum() > 0 for p in params.values())


def test_ema_is_repartitioned_exactly(resumed):
    from mogan_ds.checkpoint.consolidate import full_ema, generator_config, trainable_order, trainer_states

    trainer, ckpt = resumed
    full = full_ema(trainer_states(ckpt), trainable_order(generator_config(trainer.cfg)))
    names = [n for n, p in trainer.engines.generator.module.named_parameters() if p.requires_grad]
    assert len(names) == len(trainer.ema.shadow) == len(full)
    for name, shard in zip(names, trainer.ema.shadow):  # world 1: the shard is the whole parameter
        assert torch.equal(shard.reshape(-1), full[name].reshape(-1)), name


def test_trainer_exports_at_a_middle_step_equal_the_offline_cli(resumed, tmp_path):
    from mogan_ds.__main__ import main
    from mogan_ds.checkpoint.export import export_generator

    trainer, ckpt = resumed
    ours = trainer.export()  # the EMA (this run keeps one), at step 1
    raw = export_generator(trainer.engines.generator.module, trainer.cfg.models.root, tmp_path / "raw_trainer")
    run_dir = ckpt.parents[1]
    for flags, reference in (([], raw), (["--ema"], ours)):
        out = tmp_path / ("cli" + "".join(flags))
        assert main(["export", "--run-dir", str(run_dir), "--step", "1", *flags, "--out", str(out)]) == 0
        assert (out / TRANSFORMER).read_bytes() == (reference / TRANSFORMER).read_bytes(), flags
    a, b = load_file(raw / TRANSFORMER), load_file(ours / TRANSFORMER)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_more_steps_run_on_the_new_layout(resumed):
    trainer, ckpt = resumed
    trainer.fit()  # step 2 on one rank, checkpoint, export
    rows = [json.loads(line) for line in (ckpt.parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2
    assert all(math.isfinite(rows[-1][k]) for k in ("dmd_loss", "fake_score_loss", "g_gan_loss", "d_loss"))
    new = ckpt.parent / "step_00000002" / "trainer" / "rank_00000.pt"
    assert torch.load(new, weights_only=False)["layout"] == {"dp": 1, "sp": 1}


def test_one_rank_checkpoint_resumes_on_two_ranks_with_sequence_parallelism(resumed, tiny_workdir, tmp_path):
    """dp 1 x sp 1 -> dp 1 x sp 2 (the tiny DiT's 4 heads split over 2 ranks), through the launcher."""
    import subprocess

    from scale_runs import check, train_args

    from mogan_ds.checkpoint.consolidate import (
        engine_fp32_state_dict,
        full_ema,
        generator_config,
        trainable_order,
        trainer_states,
    )
    from mogan_ds.cli.launcher import REPO, deepspeed_command, launch_env

    trainer, ckpt = resumed
    if trainer.step < 2:  # this test alone: make the one-rank checkpoint first
        trainer.fit()
    run_dir = ckpt.parents[1]
    src = run_dir / "checkpoints" / "step_00000002"
    probe_file = tmp_path / "probe.pt"
    args = [*train_args(tiny_workdir, run_dir, 3, "parallel.sp_size=2"), "--probe", str(probe_file)]
    cmd = deepspeed_command(2, REPO / "tests" / "dist" / "reshape_probe.py", args)
    check(subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=1200))
    probe = torch.load(probe_file, weights_only=False)
    assert probe["layout"] == {"dp": 1, "sp": 2} and probe["step"] == 2
    for role in ("generator", "fake_score", "discriminator"):
        saved = engine_fp32_state_dict(src, role)
        assert probe[role].keys() <= saved.keys() and len(probe[role]) > 10
        assert all(torch.equal(v, saved[k]) for k, v in probe[role].items()), role
    order = trainable_order(generator_config(trainer.cfg))
    ema = full_ema(trainer_states(src), order)
    assert all(torch.equal(probe["ema"][n], ema[n]) for n, _ in order)
    # dp unchanged (1 -> 1): the clip stream continues exactly where the one-rank run stopped
    assert probe["clips"] == trainer_states(src)[0]["clips"] and probe["clips"]["batches"] > 0
    # and the run went on for a step on the new layout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and math.isfinite(rows[-1]["g_gan_loss"])
    new = run_dir / "checkpoints" / "step_00000003" / "trainer"
    assert sorted(p.name for p in new.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
