"""`models.zero_init`: networks built partitioned (deepspeed.zero.Init + safetensors read tensor by tensor).

In one process (world 1, fast): a bf16 ZeRO-3 engine around a partitioned build equals one
around the full build (parameters, fp32 RoPE buffers, forward output; the discriminator
with its fresh heads too), a sharded safetensors folder loads like a single file, and a
checkpoint that does not match is refused. Through the real `deepspeed` launcher on 2 CPU
ranks (tests/dist/zero_init_parity.py, slow): the tiny recipe built both ways has identical
consolidated weights, losses, weights after the steps and EMA shards; the networks are
partitioned before any engine exists and the gathered loading path equals the direct one.
The partitioned side also runs the frozen teacher as a ZeRO-3 inference engine (the reference
keeps it a replica): the DMD losses, hence the teacher's CFG outputs, are identical. In one
process, the teacher engine's parameters, dtypes (fp32-kept modules in bf16) and output equal
the replica's.
One launch, at dp 1 x sp 2: ZeRO-3 partitions over both ranks there as at dp 2, and the
Ulysses wrapping runs on the partitioned networks (`--sp 1` runs the dp 2 case by hand).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from mogan_ds.cli.launcher import REPO, deepspeed_command, launch_env

WORKER = REPO / "tests" / "dist" / "zero_init_parity.py"


def _ds(stage: int = 3, bf16: bool = True) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "bf16": {"enabled": bf16},
        # persistence threshold > 0: small parameters are kept gathered by the engine (as in zero3_bf16.json)
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 1000},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    }


@pytest.fixture(scope="module")
def topo():
    from mogan_ds.parallel import Topology, init_distributed

    init_distributed()
    return Topology.from_world(1)


def _engine(module, ds, topo):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=ds, mpu=topo)
    return engine


def _gathered(module) -> dict[str, torch.Tensor]:
    import deepspeed

    out = {}
    for n, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[n] = p.detach().clone()
    return out


def _wan_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, 2, 8, 8, generator=g).to(dtype),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g).to(dtype),
        "return_dict": False,
    }


def test_bf16_partitioned_generator_equals_the_full_build(tiny_models, topo):
    from mogan_ds.models.builders import load_transformer
    from mogan_ds.models.partitioned import load_partitioned_transformer

    path = tiny_models / "generator"
    full = _engine(load_transformer(path, torch.float32), _ds(), topo)
    part_module = load_partitioned_transformer(path, _ds(), topo)
    # Partitioned as built (world 1: the partition is the whole tensor, but no parameter keeps full data).
    assert all(hasattr(p, "ds_id") and p.data.numel() == 0 for p in part_module.parameters())
    part = _engine(part_module, _ds(), topo)
    a, b = _gathered(full.module), _gathered(part.module)
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype == torch.bfloat16, n
        assert torch.equal(a[n], b[n]), n
    # RoPE tables stay fp32 and exact (DeepSpeed's default bf16 tensor override would round them).
    for (n, x), (_, y) in zip(full.module.named_buffers(), part.module.named_buffers()):
        assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y), n
    with torch.no_grad():
        out_full, out_part = full(**_wan_inputs(torch.bfloat16))[0], part(**_wan_inputs(torch.bfloat16))[0]
    assert out_full.abs().max() > 0 and torch.equal(out_full, out_part)


def test_bf16_partitioned_discriminator_equals_the_full_build(tiny_models, topo):
    from mogan_ds.config import load_config
    from mogan_ds.motion.discriminator import build_discriminator
    from mogan_ds.train.networks import build_partitioned_discriminator

    gan = load_config("tiny", []).gan
    teacher = tiny_models / "wan" / "transformer"
    prompt = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    full = _engine(build_discriminator(teacher, gan, prompt, torch.float32), _ds(), topo)
    torch.manual_seed(3)
    part = _engine(build_partitioned_discriminator(teacher, gan, prompt, _ds(), topo, False), _ds(), topo)
    a, b = _gathered(full.module), _gathered(part.module)
    assert a.keys() == b.keys() and any(n.startswith("heads.") for n in a)
    for n in a:  # the fresh heads too: the same random numbers in the same order
        assert torch.equal(a[n], b[n]), n
    assert torch.equal(full.module.prompt_embeds, part.module.prompt_embeds)
    x = torch.randn(2, 16, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(full(x), part(x))


@pytest.mark.parametrize("frozen_dtype", ["bf16", "fp32"])
def test_partitioned_teacher_engine_equals_the_replica(tiny_models, topo, frozen_dtype):
    """The ZeRO-3 inference teacher: the replica's values and dtypes (fp32-kept modules too), its output exactly."""
    from mogan_ds.config import load_config
    from mogan_ds.models.builders import DTYPES, freeze, load_transformer
    from mogan_ds.models.partitioned import load_partitioned_frozen_transformer
    from mogan_ds.sampling.samplers import transformer_velocity_fn
    from mogan_ds.train.engines import build_teacher_engine

    path = tiny_models / "wan" / "transformer"
    cfg = load_config("tiny", [f"models.frozen_dtype={frozen_dtype}"])
    base = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000}}  # no precision: fp32 JSON
    replica = freeze(load_transformer(path, DTYPES[frozen_dtype]), torch.device("cpu"))
    from mogan_ds.train.roles import plan_roles

    plan = plan_roles(cfg, base, topo)["teacher"]
    assert plan.partitioned and not plan.trainable and plan.stage == 3
    module = load_partitioned_frozen_transformer(path, plan.ds_config, topo)
    assert all(hasattr(p, "ds_id") and p.data.numel() == 0 and not p.requires_grad for p in module.parameters())
    engine = build_teacher_engine(module, plan, topo)
    assert engine.optimizer is None or type(engine.optimizer).__name__ == "DeepSpeedZeRoOffload"
    ref, got = dict(replica.named_parameters()), _gathered(engine.module)
    assert ref.keys() == got.keys()
    kept = [n for n in ref if ref[n].dtype == torch.float32]
    if frozen_dtype == "bf16":  # diffusers keeps the time embedder, modulation tables and norm2 in fp32
        assert kept and len(kept) < len(ref) and any("scale_shift_table" in n for n in kept)
    for n in ref:
        assert got[n].dtype == ref[n].dtype and torch.equal(got[n], ref[n]), n
    for (n, x), (_, y) in zip(replica.named_buffers(), engine.module.named_buffers()):
        assert x.dtype == y.dtype and torch.equal(x, y), n
    # The trainer's teacher call: the engine's module under no_grad, CFG-batched inputs.
    x = _wan_inputs(torch.float32)
    fn_ref, fn_got = transformer_velocity_fn(replica), transformer_velocity_fn(engine.module)
    args = (
        torch.cat([x["hidden_states"]] * 2),
        torch.tensor([500.0, 757.0]),
        torch.cat([x["encoder_hidden_states"]] * 2),
    )
    with torch.no_grad():
        a, b = fn_ref(*args), fn_got(*args)
    assert a.abs().max() > 0 and torch.equal(a, b)
    # Still partitioned after the forward (released layer by layer), except persistent small parameters.
    assert any(p.data.numel() == 0 for p in engine.module.parameters())


def test_sharded_folder_loads_like_the_single_file(tiny_models, topo, tmp_path):
    from diffusers import WanTransformer3DModel

    from mogan_ds.models.partitioned import load_partitioned_transformer, safetensors_index

    src = tiny_models / "generator"
    WanTransformer3DModel.from_pretrained(src).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = safetensors_index(tmp_path / "sharded")
    assert len(set(index.values())) > 1 and list((tmp_path / "sharded").glob("*.index.json"))
    ds = _ds(bf16=False)
    a = _gathered(load_partitioned_transformer(src, ds, topo))
    b = _gathered(load_partitioned_transformer(tmp_path / "sharded", ds, topo))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    ref = WanTransformer3DModel.from_pretrained(src).state_dict()
    assert all(torch.equal(a[n], ref[n]) for n in a)


def test_read_flat_range_reads_any_span(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mogan_ds.models.partitioned import read_flat_range

    t = torch.arange(7 * 5 * 3, dtype=torch.float32).reshape(7, 5, 3)
    save_file({"t": t, "s": torch.tensor(4.0)}, str(tmp_path / "x.safetensors"))
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as fh:
        for start, end in [(0, 105), (0, 1), (14, 16), (15, 30), (16, 104), (104, 105), (50, 50)]:
            assert torch.equal(read_flat_range(fh, "t", start, end), t.reshape(-1)[start:end]), (start, end)
        assert torch.equal(read_flat_range(fh, "s", 0, 1), torch.tensor([4.0]))


def test_mismatched_checkpoint_is_refused(tiny_models, topo, tmp_path):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file, save_file

    from mogan_ds.models.builders import transformer_config
    from mogan_ds.models.partitioned import PartitionedBuild, load_into_partitions

    src = tiny_models / "generator"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    state = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    state.pop("proj_out.bias")
    save_file(state, str(bad / "diffusion_pytorch_model.safetensors"))
    with PartitionedBuild(_ds(), topo):
        model = WanTransformer3DModel.from_config(transformer_config(src))
    with pytest.raises(ValueError, match=r"missing \['proj_out.bias'\]"):
        load_into_partitions(model, bad)
    with pytest.raises(ValueError, match="ZeRO stage 3 only"):
        PartitionedBuild(_ds(stage=2), topo)


def test_roles_follow_their_own_zero_stage(tiny_workdir, topo):
    """One build decision per role (`plan_roles`): the networks, the engines and the planner read the same plans."""
    from mogan_ds.config import load_config
    from mogan_ds.train.roles import load_ds_config, plan_roles

    def partitioned(cfg, base):
        return sorted(r for r, p in plan_roles(cfg, base, topo).items() if p.partitioned)

    base = load_ds_config(REPO / "ds_configs" / "zero3_cpu.json")
    cfg = load_config("tiny", [*tiny_workdir])
    plans = plan_roles(cfg, base, topo)
    assert partitioned(cfg, base) == ["discriminator", "fake_score", "generator", "teacher"]
    assert all(p.stage == 3 and p.ds_config["zero_optimization"]["stage"] == 3 for p in plans.values())
    assert [r for r, p in plans.items() if p.trainable] == ["generator", "fake_score", "discriminator"]
    # models.zero_init concerns the trainable networks; the teacher follows its own stage
    assert partitioned(load_config("tiny", [*tiny_workdir, "models.zero_init=false"]), base) == ["teacher"]
    z2 = {**base, "zero_optimization": {"stage": 2}}
    assert partitioned(cfg, z2) == []
    assert plan_roles(cfg, z2, topo)["teacher"].ds_config is None
    assert partitioned(load_config("tiny", [*tiny_workdir, "gan.enabled=false"]), base) == [
        "fake_score",
        "generator",
        "teacher",
    ]
    assert sorted(plan_roles(load_config("tiny", [*tiny_workdir, "dmd.enabled=false"]), base, topo)) == [
        "discriminator",
        "generator",
    ]
    assert all(not p.partitioned and p.ds_config is None for p in plan_roles(cfg, None, topo).values())


# ----------------------------------------------------------------------------- 2 ranks


def run_worker(sp: int, tiny_workdir, out_dir: Path) -> dict:
    args = out_dir / "workdir_args.json"
    args.write_text(json.dumps(list(tiny_workdir)))
    out = out_dir / "result.json"
    cmd = deepspeed_command(
        2, WORKER, ["--sp", str(sp), "--workdir-args", str(args), "--run-root", str(out_dir), "--out", str(out)]
    )
    proc = subprocess.run(
        cmd, cwd=REPO, env=launch_env({"DS_ACCELERATOR": "cpu"}), capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0 and out.exists(), f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def _assert_parity(result: dict) -> None:
    checks = result["checks"]
    names = [n for n in checks if n.split("_")[0] in ("weights", "after", "ema") or n.startswith("step")]
    for prefix in ("weights_generator", "weights_fake_score", "weights_discriminator", "after_generator", "ema"):
        assert prefix in checks, prefix
    assert sum(n.startswith("step") for n in names) >= 2 * 6
    # Identical: the same values reach the same partitions, so every step is bit for bit the same.
    bad = {n: checks[n] for n in names if checks[n]["max_abs"] != 0.0}
    assert not bad, json.dumps(bad, indent=1)
    assert all(checks[n]["ref_max"] > 0 for n in names if not n.endswith(("r1_gap", "r2_gap")))
    gathered = {n: c for n, c in checks.items() if n.startswith("gathered_load_")}
    assert gathered and all(c["max_abs"] == 0.0 for c in gathered.values())
    facts = result["facts"]
    assert facts["gathered_path_counts"]["gathered"] > 0 and facts["gathered_path_counts"]["direct"] == 0
    for role in ("generator", "fake_score", "discriminator", "teacher"):
        f = facts[role]
        assert f["all_zero3"] and f["no_full_data"], (role, f)
        assert f["partition_numel"] == f["expected_partition_numel"] < f["full_numel"], (role, f)
    # The teacher: a ZeRO-3 inference engine (never saved: not among the trainable engines) whose
    # module the trainer calls, vs a frozen replica in the reference run; the DMD losses above
    # (its CFG output against the fake score's) are equal, so both teachers computed the same.
    assert facts["teacher_partitioned"]
    assert facts["teacher_engine"]["True"] == {
        "engine": True,
        "is_engine_module": True,
        "partitioned": True,
        "requires_grad": False,
        "saved": False,
    }
    assert facts["teacher_engine"]["False"]["engine"] is False and not facts["teacher_engine"]["False"]["partitioned"]
    assert all(checks[f"step{k}_dmd_loss"]["ref_max"] > 0 for k in range(2))
    # And in bf16 over both ranks: bf16 and fp32-kept partitions, the replica's values and output exactly.
    assert facts["teacher_bf16"]["partition_dtypes"] == ["torch.bfloat16", "torch.float32"]
    for name in ("teacher_bf16_param_values", "teacher_bf16_output"):
        assert checks[name]["max_abs"] == 0.0 and checks[name]["ref_max"] > 0, (name, checks[name])
    # The steps did train: losses move from step to step.
    rows = facts["losses"]["True"]
    assert rows[0]["d_loss"] != rows[1]["d_loss"]


@pytest.mark.slow
def test_two_ranks_sp2_zero_init_equals_the_full_build(tiny_workdir, tmp_path):
    result = run_worker(2, tiny_workdir, tmp_path)
    assert (result["facts"]["dp"], result["facts"]["sp"]) == (1, 2)
    assert any("Ulysses" in p for p in result["facts"]["attention_processors"])
    _assert_parity(result)
