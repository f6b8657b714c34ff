"""The trainer in one process (world 1, ZeRO-3 engines on CPU): each phase's effect, the
discriminator's freeze during the generator's GAN step, non-finite handling, switches, export."""

import contextlib
import json
import math

import pytest
import torch
from conftest import FAST

import mogan_ds.train.step as step_mod
from mogan_ds import metric_names as M
from mogan_ds.cli.launcher import REPO
from mogan_ds.config import load_config
from mogan_ds.train.trainer import MoGANTrainer, NonFiniteLossError

DS_CPU = str(REPO / "ds_configs" / "zero3_cpu.json")


def make_trainer(tiny_workdir, run_dir, *extra):
    return MoGANTrainer(load_config("tiny", [*tiny_workdir, f"output.run_dir={run_dir}", *FAST, *extra]), DS_CPU)


@pytest.fixture(scope="module")
def trainer(tiny_workdir, tmp_path_factory):
    return make_trainer(tiny_workdir, tmp_path_factory.mktemp("run"))


def snapshot(engine):
    # world 1: the ZeRO-3 partition of every parameter is the whole parameter
    return [p.ds_tensor.detach().clone() for p in engine.module.parameters()]


def moved(before, engine):
    return [not torch.equal(a, p.ds_tensor) for a, p in zip(before, engine.module.parameters())]


def run_phase(trainer, fn, *args):
    before = {r: snapshot(e) for r, e in trainer.engines.items()}
    out = fn(*args)
    return out, {r: moved(before[r], e) for r, e in trainer.engines.items()}


def test_phase1_dmd_moves_only_the_generator(trainer):
    logs, mv = run_phase(trainer, trainer.iteration.generator_dmd_update, 0)
    assert math.isfinite(logs["dmd_loss"]) and logs["dmd_grad_norm"] > 0
    assert any(mv["generator"]) and not any(mv["fake_score"]) and not any(mv["discriminator"])


def test_phase2_fake_score_moves_only_the_fake_score(trainer):
    logs, mv = run_phase(trainer, trainer.iteration.fake_score_update, 0, 0)
    assert math.isfinite(logs["fake_score_loss"])
    assert any(mv["fake_score"]) and not any(mv["generator"]) and not any(mv["discriminator"])


def test_phase3_gan_moves_generator_not_discriminator(trainer):
    from deepspeed.utils import safe_get_full_grad

    (logs, fakes, start), mv = run_phase(trainer, trainer.iteration.generator_gan_update, 0)
    assert any(mv["generator"]) and not any(mv["fake_score"])
    # D is a gradient path only: bit-identical, no gradient accumulated, still trainable
    assert not any(mv["discriminator"])
    d = trainer.engines.discriminator
    for p in d.module.parameters():
        g = safe_get_full_grad(p)
        assert g is None or not g.any()
        assert p.requires_grad
    assert len(fakes) == 1 and not fakes[0].requires_grad
    # phase 4 right after: D's own backward must work (the ZeRO-3 hook trap) and move only D
    logs4, mv4 = run_phase(trainer, trainer.iteration.discriminator_update, 0, fakes, start)
    assert any(mv4["discriminator"]) and not any(mv4["generator"]) and not any(mv4["fake_score"])
    assert {"d_loss", "d_real_logit", "d_fake_logit", "r1_gap", "r2_gap"} <= set(logs4)


def test_train_step_runs_all_four_phases(trainer):
    logs = trainer.iteration.train_step(1)
    for phase in step_mod.PHASES:
        assert logs[f"time_{phase}"] > 0
    assert all(math.isfinite(v) for v in logs.values())
    # per-phase accelerator memory: not on the CPU, where the figures would be the host's
    assert not any(k.startswith((M.PEAK_MEM_PREFIX, M.PEAK_RESERVED_PREFIX)) for k in logs)


def test_phase_peaks_are_logged_on_an_accelerator(trainer, monkeypatch):
    """On a device each phase's peak allocated/reserved memory joins the step's logs (stats reset per phase)."""
    s = trainer.iteration
    # Any non-CPU device takes the accelerator branch; DeepSpeed's CPU accelerator then reports host figures.
    monkeypatch.setattr(s, "device", torch.device("meta"))
    for fn in ("generator_dmd_update", "fake_score_update", "discriminator_update"):
        monkeypatch.setattr(s, fn, lambda *a: {})
    monkeypatch.setattr(s, "generator_gan_update", lambda *a: ({}, [], None))
    logs = s.train_step(1)
    for phase in step_mod.PHASES:
        assert 0 < logs[M.peak_mem_key(phase)] <= logs[M.peak_reserved_key(phase)] + 1e-9


def test_planner_and_trainer_build_the_same_step(trainer):
    """The planner's iteration is the trainer's class, made by the same factory: the same attributes
    (nothing set from outside on either), the same schedule, window spec and settings, and the class's
    own phase methods. What differs is only what `build_step` takes as arguments: stand-in engines,
    fake batches, fixed draws and one micro step per phase."""
    from mogan_ds.plan.runner import prepare

    run = trainer.iteration
    plan = prepare(trainer.cfg, world_size=1, trainable_dtype=torch.float32, device="cpu").step
    assert type(run) is type(plan) is step_mod.MoGANStep
    assert vars(run).keys() == vars(plan).keys()
    assert repr(run.schedule) == repr(plan.schedule) and run.cfg == plan.cfg
    assert run.motion.window == plan.motion.window and run.motion.space == plan.motion.space
    assert (run.guard.limit, run.topo.dp_size, run.topo.sp_size) == (plan.guard.limit, 1, 1)
    for name in ("train_step", *(f"{p}_update" for p in (*step_mod.PHASES, "generator_dmd_gan")), "_backward_step"):
        assert name not in vars(run) and name not in vars(plan), name
    # the planner's documented choices, passed to the factory
    assert (plan.gas, plan.disc_gas) == (1, 1)
    assert plan.draw_entry(torch.Generator()) == (len(trainer.cfg.schedule.denoising_timesteps) - 1) // 2


def test_nonfinite_loss_skips_then_stops(trainer, monkeypatch):
    def nan_loss(v_pred, x0, eps):
        return v_pred.float().mean() * float("nan"), {"fake_score_loss": float("nan")}

    monkeypatch.setattr(step_mod, "flow_matching_loss", nan_loss)
    guard = trainer.iteration.guard
    monkeypatch.setattr(guard, "limit", 2)
    guard.streak = 0
    total = guard.total
    _, mv = run_phase(trainer, trainer.iteration.fake_score_update, 5, 0)
    assert not any(mv["fake_score"])  # the update was skipped, the weights are untouched
    assert guard.total == total + 1
    with pytest.raises(NonFiniteLossError, match="max_nonfinite=2"):
        trainer.iteration.fake_score_update(5, 1)
    guard.streak = 0


def test_export_loads_in_wanpipeline_and_generates(trainer):
    from diffusers import WanPipeline

    out = trainer.export()
    pipe = WanPipeline.from_pretrained(out)
    live = [p.ds_tensor[: p.ds_numel].view(p.ds_shape) for p in trainer.engines.generator.module.parameters()]
    exported = dict(pipe.transformer.named_parameters())
    names = [n for n, _ in trainer.engines.generator.module.named_parameters()]
    assert all(torch.equal(exported[n], w) for n, w in zip(names, live))
    video = pipe(
        prompt="a red ball",
        num_frames=5,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        max_sequence_length=32,
        output_type="np",
    ).frames
    assert video.shape == (1, 5, 64, 64, 3) and torch.isfinite(torch.as_tensor(video)).all()


@pytest.mark.parametrize(
    "switches, engines",
    [
        (["gan.enabled=false"], {"generator", "fake_score"}),  # DMD-only baseline / warm-up
        (["dmd.enabled=false", "gan.space=latent", "gan.r1=0", "gan.r2=0"], {"generator", "discriminator"}),
    ],
)
def test_paper_rows_as_switches(tiny_workdir, tmp_path, switches, engines):
    t = make_trainer(tiny_workdir, tmp_path, *switches)
    assert {r for r, _ in t.engines.items()} == engines
    logs = t.iteration.train_step(0)
    assert all(math.isfinite(v) for v in logs.values())
    if "gan.enabled=false" in switches:
        assert "g_gan_loss" not in logs and t.iteration.motion is None
    else:
        assert "dmd_loss" not in logs and "r1_gap" not in logs


def test_fresh_start_refuses_to_overwrite_checkpoints(tiny_workdir, tmp_path):
    from mogan_ds.checkpoint.manager import CheckpointManager

    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000004" / "COMPLETE").write_text("4\n")
    assert CheckpointManager(tmp_path).latest() is not None
    with pytest.raises(FileExistsError, match="--resume"):
        make_trainer(tiny_workdir, tmp_path)
    assert (tmp_path / "checkpoints" / "step_00000004" / "COMPLETE").is_file()


def test_missing_weights_folder_is_a_clear_error(tiny_workdir, tmp_path):
    from mogan_ds.models.builders import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="nowhere"):
        make_trainer(tiny_workdir, tmp_path, f"models.generator={tmp_path / 'nowhere'}")


def test_discriminator_batch_larger_than_the_generators(tiny_workdir, tmp_path, monkeypatch):
    """gan.disc_batch_size=2 with a generator batch of 1: D's engine accumulates two micro steps,
    each with one real clip and one fake; the second fake is an extra detached generator sample."""
    t = make_trainer(tiny_workdir, tmp_path, "gan.disc_batch_size=2", "dmd.enabled=false")
    d = t.engines.discriminator
    assert (t.iteration.gas, t.iteration.disc_gas, d.gradient_accumulation_steps(), d.train_batch_size()) == (
        1,
        2,
        2,
        2,
    )
    assert t.engines.generator.train_batch_size() == 1
    # the run states it once, with the effective R1/R2 weights lambda * sigma^2 (defaults 100 x 0.1^2)
    assert "D batch 2 (accumulation 2)" in t.describe() and "gradient-penalty weights (1, 1)" in t.describe()
    calls = {"real": 0, "extra": 0}
    real, extra = t.iteration.motion.real, t.iteration._extra_fake

    def count_real(*a, **k):
        calls["real"] += 1
        return real(*a, **k)

    def count_extra(*a, **k):
        calls["extra"] += 1
        out = extra(*a, **k)
        assert not out.requires_grad
        return out

    monkeypatch.setattr(t.iteration.motion, "real", count_real)
    monkeypatch.setattr(t.iteration, "_extra_fake", count_extra)
    (logs, fakes, window), _ = run_phase(t, t.iteration.generator_gan_update, 0)
    logs4, mv4 = run_phase(t, t.iteration.discriminator_update, 0, fakes, window)
    assert calls == {"real": 2, "extra": 1}
    assert any(mv4["discriminator"]) and not any(mv4["generator"])  # one applied update after two micro steps
    assert d.global_steps == 1 and math.isfinite(logs4["d_loss"])


def test_motion_metrics_during_training_follow_the_ema(tiny_workdir, tmp_path):
    """eval.every: the generator's EMA samples the fixed set, rank 0 scores it, and the step's
    metrics row carries eval_* next to the losses (dynamics degree on the training RAFT)."""
    from mogan_ds.train.metrics import read_metrics

    t = make_trainer(
        tiny_workdir, tmp_path, "eval.every=1", "eval.num_prompts=1", "eval.seeds=[0, 1]", "train.ema_decay=0.5"
    )
    gen = t.engines.generator.module
    live = [p.ds_tensor.detach().clone() for p in gen.parameters() if p.requires_grad]
    for s in t.ema.shadow:  # an EMA visibly different from the training weights
        s.add_(0.05)
    with t.ema.compute_swapped_in():
        inside = [p.ds_tensor.detach().clone() for p in gen.parameters() if p.requires_grad]
    assert all(torch.equal(a, s.to(a.dtype).view(a.shape)) for a, s in zip(inside, t.ema.shadow))
    assert all(torch.equal(a, p.ds_tensor) for a, p in zip(live, [p for p in gen.parameters() if p.requires_grad]))
    t.fit()  # one step: train, evaluate, log, checkpoint, export
    (row,) = read_metrics(tmp_path)
    assert row["eval_num_videos"] == 2 and 0.0 <= row["eval_dynamics_degree"] <= 1.0
    assert math.isfinite(row["dmd_loss"]) and "eval_motion_smoothness" not in row  # AMT-S weights not given: n/a


def test_profile_step_writes_each_phase_and_its_top_operators(trainer, monkeypatch):
    """logging.profile_step: that iteration runs under torch.profiler; its phase ranges match the step's own timings."""
    lg = trainer.cfg.logging
    monkeypatch.setattr(lg, "profile_step", trainer.step + 2)
    assert isinstance(trainer._profiler(), contextlib.nullcontext)  # another iteration's
    monkeypatch.setattr(lg, "profile_step", trainer.step + 1)
    with trainer._profiler():
        logs = trainer.iteration.train_step(trainer.step)
    stem = trainer.run_dir / "logs" / f"profile_step_{trainer.step + 1}"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert "Self CPU" in stem.with_suffix(".txt").read_text()
    assert set(data["phases_ms"]) == set(step_mod.PHASES) == set(data["phase_top"])
    for phase in step_mod.PHASES:
        measured_ms = logs[f"time_{phase}"] * 1e3
        assert abs(data["phases_ms"][phase] - measured_ms) <= 0.1 * measured_ms + 5, phase
        assert data["phase_top"][phase]["work_ms"] > 0 and data["phase_top"][phase]["top"]
    assert 0 < len(data["top"]) <= lg.profile_rows
    assert sum(r["share"] for r in data["top"]) <= 1.0 + 1e-6
    assert any(r["name"].startswith("aten::") for r in data["top"])


def test_train_deterministic_is_applied_before_the_set_up(tiny_workdir, tmp_path, monkeypatch):
    import mogan_ds.train.trainer as trainer_mod

    seen = []

    class ReachedError(Exception):
        pass

    def record(enabled):
        seen.append(enabled)
        raise ReachedError

    monkeypatch.setattr(trainer_mod, "set_deterministic", record)
    with pytest.raises(ReachedError):
        make_trainer(tiny_workdir, tmp_path, "train.deterministic=true")
    assert seen == [True]


def test_set_deterministic_switches_torch_to_deterministic_kernels(monkeypatch):
    from mogan_ds.train.determinism import CUBLAS_WORKSPACE, set_deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    set_deterministic(False)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic) == before
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic = before[1]
