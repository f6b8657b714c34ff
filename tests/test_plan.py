"""`python -m mogan_ds plan`: the SDPA FLOP formula, the live-bytes tracker, and the planner
against the same phases run for real on CPU (tiny recipe, one process, no DeepSpeed)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from mogan_ds.config import load_config
from mogan_ds.plan.flops import CPU_SDPA, CPU_SDPA_BACKWARD, count_flops
from mogan_ds.plan.memory import LiveBytes, drop_param_grads
from mogan_ds.plan.runner import _run_phase, prepare, run_iteration, trace_pass

# A small tiny-recipe variant: 2 latent chunks, one critic update, few RAFT iterations.
SMALL = ["video.num_frames=5", "gan.window=2", "dmd.critic_updates=1", "gan.raft_iters=2", "gan.raft_pairs_per_chunk=4"]


def test_cpu_sdpa_flops_forward_and_backward():
    b, h, s, d = 2, 3, 40, 16
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as fwd:
        out = F.scaled_dot_product_attention(q, k, v)
    counts = fwd.get_flop_counts()["Global"]
    assert CPU_SDPA in counts, f"the CPU kernel did not run: {counts}"
    assert fwd.get_total_flops() == 4 * b * h * s * s * d
    with FlopCounterMode(display=False) as bwd:
        out.sum().backward()
    assert CPU_SDPA_BACKWARD in bwd.get_flop_counts()["Global"]
    # score recomputation + four matmuls: 2.5x the forward
    assert bwd.get_total_flops() == 10 * b * h * s * s * d


def test_live_bytes_known_answer_on_fake_tensors():
    mib = 2**20
    with FakeTensorMode(), LiveBytes() as mem:
        x = torch.empty(mib // 4)  # 1 MiB fp32
        y = x * 2  # +1 MiB
        z = y.view(-1)[: mib // 8]  # a view: no new storage
        del x
        w = torch.cat([y, y])  # +2 MiB -> peak 3 MiB with y (x freed)
        assert mem.live == 3 * mib
        del w, z
        assert mem.live == mib
    assert mem.peak == 3 * mib


def test_live_bytes_ignores_views_of_earlier_storages():
    # linear views its weight as weight.t(): a parameter's bytes are model states, not activations
    w = torch.randn(256, 256)
    with LiveBytes() as mem:
        wt = w.t()
        w.mul_(2)
        y = wt[:128].clone()  # 128 KiB, new
    assert mem.peak == mem.live == 128 * 256 * 4
    del y


def test_live_bytes_counts_a_linear_backward():
    # Linear(256 -> 512), batch 64, fp32: activations and gradients of known size.
    lin = torch.nn.Linear(256, 512)
    x = torch.randn(64, 256, requires_grad=True)
    with LiveBytes() as mem:
        y = lin(x)  # 64*512*4 = 128 KiB
        loss = y.square().sum()  # y^2 (128 KiB) + scalar
        loss.backward()
    # input grad (64 KiB) and weight/bias grads (512 KiB + 2 KiB) stay alive after backward
    assert mem.live >= 64 * 256 * 4 + 512 * 256 * 4
    assert mem.peak >= 2 * 64 * 512 * 4


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config("tiny", SMALL)


@pytest.fixture(scope="module")
def planned(tiny_cfg):
    return run_iteration(tiny_cfg, world_size=1, trainable_dtype=torch.float32)


@pytest.fixture(scope="module")
def real(tiny_cfg):
    """The same phases on real, randomly initialised CPU modules of the same architectures: the
    tracing pass without block replay, then each phase again under torch's FlopCounterMode."""
    torch.manual_seed(0)
    prep = prepare(tiny_cfg, world_size=1, trainable_dtype=torch.float32, device="cpu")
    assert trace_pass(prep, memo=False) is None
    state = {}
    reference = []
    for ph in prep.phases:
        reference.append(count_flops(lambda name=ph.name: _run_phase(prep.step, name, state), prep.labels)[1])
    return prep, reference


def test_planner_flops_equal_real_cpu_run(planned, real):
    prep, reference = real
    assert [p.name for p in prep.phases] == [p.name for p in planned.phases]
    for fake_phase, real_phase, ref in zip(planned.phases, prep.phases, reference):
        assert ref.total > 0
        # planner (fake tensors, DiT blocks replayed) == FlopCounterMode on the real run
        assert fake_phase.flops.total == ref.total, fake_phase.name
        assert fake_phase.flops.by_network == real_phase.flops.by_network, fake_phase.name
        assert "other" not in fake_phase.flops.by_network, fake_phase.name
    # where FlopCounterMode's module tracker attributes everything (no activation-checkpointed
    # motion path), its split by network is the planner's
    for fake_phase, ref in zip(planned.phases[:2], reference[:2]):
        assert fake_phase.flops.by_network == ref.by_network, fake_phase.name
    nets = set().union(*(p.flops.by_network for p in planned.phases))
    assert {"generator", "teacher", "fake_score", "vae_decode", "raft", "vae_encode", "discriminator"} <= nets


def test_planner_activation_peak_matches_real_tensors(planned, real):
    # The same tracker on real tensors (CPU has no allocator statistics): fake shapes and
    # lifetimes must give the peaks real tensors give.
    for fake_phase, real_phase in zip(planned.phases, real[0].phases):
        assert real_phase.act_peak_bytes > 0
        assert abs(fake_phase.act_peak_bytes - real_phase.act_peak_bytes) <= 0.15 * real_phase.act_peak_bytes, (
            fake_phase.name
        )


def test_cli_last_line_is_json(capsys):
    from mogan_ds.__main__ import main

    rc = main(
        [
            "plan",
            "--config",
            "tiny",
            "--ds_config",
            "ds_configs/zero3_bf16.json",
            "--nodes",
            "1",
            "--gpus-per-node",
            "2",
            "--gpu",
            "h100",
            *SMALL,
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["fits"] is True
    assert summary["iteration_tflop_per_rank"] > 0
    assert set(summary["phase_tflop"]) == {"generator_dmd", "fake_score", "generator_gan", "discriminator"}
    assert any(line.startswith("fits:") for line in lines)


def _dit_step_bytes(sp: int, latent=(1, 16, 13, 30, 52)):
    """Live-bytes peak and SP traffic of one tiny-architecture DiT forward+backward at sp (rank 0's shard)."""
    from diffusers import WanTransformer3DModel

    from mogan_ds.models.tiny import TINY_TRANSFORMER
    from mogan_ds.parallel import parallelize_wan
    from mogan_ds.plan.comm import CollectiveBytes, LocalCollectives, PlanTopology

    counter = CollectiveBytes()
    with LocalCollectives(counter):
        with torch.device("meta"):
            dit = WanTransformer3DModel.from_config(TINY_TRANSFORMER)
        parallelize_wan(dit, PlanTopology(sp, sp))
        with FakeTensorMode(allow_non_fake_inputs=True):
            dit.to_empty(device="cpu")
            x = torch.empty(latent)
            t = torch.full((1,), 500.0)
            c = torch.empty(1, 8, TINY_TRANSFORMER["text_dim"])
            with LiveBytes() as mem:
                out = dit(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False)[0]
                assert out.shape == x.shape  # gathered back to the full sequence
                out.square().mean().backward()
    return mem.peak, dict(counter.bytes), dit


def test_sequence_parallel_shard_memory_and_all_to_all_bytes():
    peak1, comm1, _ = _dit_step_bytes(1)
    peak2, comm2, dit = _dit_step_bytes(2)
    assert comm1 == {}
    # Each rank holds half the tokens outside attention: well under the sp=1 activations.
    assert peak2 <= 0.6 * peak1, (peak2, peak1)
    # Ulysses: q, k, v, out all-to-all per self-attention, forward and backward; each
    # sends (sp-1)/sp of a [B, S/sp, heads, head_dim] fp32 shard.
    heads, head_dim = dit.config.num_attention_heads, dit.config.attention_head_dim
    tokens = 13 * (30 // 2) * (52 // 2)
    per_call = 1 * tokens // 2 * heads * head_dim * 4 / 2
    assert comm2["ulysses_all_to_all"] == int(per_call) * 8 * dit.config.num_layers
    assert comm2["sp_all_gather"] > 0 and comm2["sp_reduce_scatter"] > 0


def test_block_replay_matches_running_every_block():
    """DiT blocks measured once and replayed == every block run (tiny DiT, 4 blocks, checkpointed)."""
    from diffusers import WanTransformer3DModel

    from mogan_ds.models.tiny import TINY_TRANSFORMER
    from mogan_ds.plan.memo import BlockMemo, memo_types
    from mogan_ds.plan.trace import ModuleLabels, PlanTrace

    def run(memo: bool):
        with torch.device("meta"):
            dit = WanTransformer3DModel.from_config(TINY_TRANSFORMER)
        dit.enable_gradient_checkpointing()
        with FakeTensorMode(allow_non_fake_inputs=True):
            dit.to_empty(device="cpu")
            drop_param_grads([dit])  # as the planner does: ZeRO-3 takes each gradient when complete
            labels = ModuleLabels({dit: "dit"})
            with PlanTrace(labels) as mode:
                blocks = BlockMemo(mode, None, [dit], memo_types()) if memo else None
                x, t = torch.empty(1, 16, 3, 16, 16), torch.full((1,), 500.0)
                c = torch.empty(1, 16, TINY_TRANSFORMER["text_dim"])
                with torch.no_grad():
                    dit(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False)
                no_grad_peak = mode.peak
                out = dit(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False)[0]
                out.square().mean().backward()
        return mode.take_flops(), no_grad_peak, mode.peak, blocks

    f0, ng0, p0, _ = run(False)
    f1, ng1, p1, blocks = run(True)
    assert blocks.hits > blocks.misses > 0
    assert f1.total == f0.total and f1.by_network == {"dit": f0.total}
    assert ng1 == ng0
    assert abs(p1 - p0) <= 0.05 * p0, (p1, p0)


@pytest.mark.parametrize("early_stop", [True, False])
def test_raft_replay_matches_running_every_call(early_stop):
    """RAFT calls measured once and replayed == every call run: FLOPs exactly, also when a
    checkpoint's recomputation stops at the call's last save (the call's tail FLOPs are then
    never recomputed); as RaftFlow runs it (no early stop), the peak within 5% and nothing of
    the probes left alive. (With early stop the real run also keeps the pyramid on the module
    past the stop, which RaftFlow avoids and a replay does not show.)"""
    from torch.utils.checkpoint import checkpoint
    from torchvision.models.optical_flow.raft import RAFT

    from mogan_ds.models.builders import build_raft
    from mogan_ds.plan.memo import BlockMemo
    from mogan_ds.plan.trace import ModuleLabels, PlanTrace

    def run(memo: bool):
        with torch.device("meta"):
            raft = build_raft("raft_small").requires_grad_(False)

        def pair_flow(a, b):
            flow = raft(a, b, num_flow_updates=2)[-1]
            raft.corr_block.corr_pyramid = []
            return flow

        with FakeTensorMode(allow_non_fake_inputs=True):
            raft.to_empty(device="cpu")
            with PlanTrace(ModuleLabels({raft: "raft"})) as mode:
                blocks = BlockMemo(mode, None, [raft], (RAFT,)) if memo else None
                frames = torch.empty(6, 3, 128, 128, requires_grad=True)
                with torch.no_grad():
                    pair_flow(frames[:3], frames[3:])
                flows = [
                    checkpoint(
                        pair_flow, frames[i : i + 2], frames[i + 1 : i + 3], use_reentrant=False, early_stop=early_stop
                    )
                    for i in (0, 2)
                ]
                torch.cat(flows).square().mean().backward()
                del flows, frames
                left = mode.live
        return mode.take_flops(), mode.peak, left, blocks

    f0, p0, left0, _ = run(False)
    f1, p1, left1, blocks = run(True)
    assert blocks.hits > 0 and any(e is not None and e.tail > 0 for e in blocks.entries.values())
    assert f1.total == f0.total and f1.by_network == {"raft": f0.total}
    if not early_stop:
        assert abs(p1 - p0) <= 0.05 * p0, (p1, p0)
        assert left1 == left0 == 0


def test_14b_preset_and_recipe():
    from mogan_ds.cli.info import plan_networks

    plans, source = plan_networks(load_config("wan2.1-t2v-14b"))
    by = {p.name: p for p in plans}
    assert source == "preset wan2.1-t2v-14b"
    for name in ("generator", "fake_score", "teacher"):
        assert by[name].params == 14_288_491_584
    cfg = load_config("wan2.1-t2v-14b")
    # the paper's D depth (16 of 30 blocks) and head depths (8, 14, 16 of 30) at 40 layers
    assert cfg.gan.disc_blocks == round(16 / 30 * 40)
    assert [round((b + 1) / 40 * 30) for b in cfg.gan.head_blocks] == [8, 14, 16]


def test_stage2_model_states_equal_deepspeeds_estimator():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from mogan_ds.plan.memory import zero_model_states

    with torch.device("meta"):
        module = torch.nn.Sequential(torch.nn.Linear(640, 1280), torch.nn.Linear(1280, 320))
    n = sum(p.numel() for p in module.parameters())
    for offload in (False, True):
        s = zero_model_states("generator", module, 8, 2, offload, False, stage=2)
        assert s.gpu_bytes == estimate_zero2_model_states_mem_needs(n, 8, 2, cpu_offload=offload)[1]
        # full bf16 weights on every rank + 18 bytes/param over the 16 ranks (2 with the optimizer offloaded)
        assert s.gpu_bytes == 2 * n + (0 if offload else 18 * n // 16)
        assert abs(sum(s.breakdown.values()) - s.gpu_bytes) <= 8
        assert s.stage == 2 and (s.host_bytes > 0) == offload
    with pytest.raises(ValueError, match="offload"):
        zero_model_states("generator", module, 8, 2, True, True, stage=2)


def test_plan_models_zero2_roles_and_the_offload_preset():
    """One traced iteration, three DeepSpeed layouts: ZeRO-3 everywhere, ZeRO-2 for G and the
    fake score, the optimizer-offload JSON; model states and ZeRO traffic follow each role's stage."""
    from mogan_ds.cli.launcher import REPO
    from mogan_ds.plan.report import make_plan
    from mogan_ds.train.roles import load_ds_config

    ds = load_ds_config(REPO / "ds_configs" / "zero3_bf16.json")
    offload = load_ds_config(REPO / "ds_configs" / "zero3_bf16_offload.json")
    z2 = ["parallel.zero_stage.generator=2", "parallel.zero_stage.fake_score=2"]
    z3_plan = make_plan(load_config("tiny", SMALL), ds, 1, 2, "h100")
    z2_plan = make_plan(load_config("tiny", SMALL + z2), ds, 1, 2, "h100")
    off_plan = make_plan(load_config("tiny", SMALL), offload, 1, 2, "h100")
    assert z2_plan.run is z3_plan.run is off_plan.run  # the stages change no traced figure: one trace
    stages = {s.name: s.stage for s in z2_plan.states if s.trainable}
    assert stages == {"generator": 2, "fake_score": 2, "discriminator": 3}
    calls = {}
    for ph in z3_plan.run.phases:
        for r, c in ph.engine_calls.items():
            calls[r] = calls.get(r, 0) + c.updates * ph.repeats
    world, steps = 2, {"generator": 2, "fake_score": 1, "discriminator": 1}  # SMALL: one critic update
    for role in ("generator", "fake_score"):
        params = sum(p.numel() for p in z3_plan.run.modules[role].parameters())
        shard = params * 2 * (world - 1) / world
        # ZeRO-2: one all-gather of the updated weights per step, a reduce-scatter per backward, no per-forward gathers
        assert z2_plan.comm_bytes[f"zero2_all_gather ({role})"] == int(shard * steps[role])
        assert z2_plan.comm_bytes[f"zero2_reduce_scatter ({role})"] == int(shard * calls[role])
        assert f"zero3_all_gather ({role})" not in z2_plan.comm_bytes
        assert z3_plan.comm_bytes[f"zero3_all_gather ({role})"] > z2_plan.comm_bytes[f"zero2_all_gather ({role})"]
    for kind in ("zero3_all_gather (discriminator)", "zero3_reduce_scatter (discriminator)"):
        assert z2_plan.comm_bytes[kind] == z3_plan.comm_bytes[kind]
    assert z2_plan.state_bytes > z3_plan.state_bytes and z2_plan.comm_s < z3_plan.comm_s
    assert z2_plan.iteration_flops.total == z3_plan.iteration_flops.total
    # offload: optimizer states leave the GPU; the CPU step and host copies add time
    assert off_plan.state_bytes < z3_plan.state_bytes and off_plan.host_bytes_per_node > 0
    assert off_plan.offload_s > 0 and z3_plan.offload_s == 0
    assert off_plan.seconds == pytest.approx(z3_plan.seconds + off_plan.offload_s)


def test_split_motion_path_is_planned_per_share(planned):
    """At sp 2 the planner builds the motion path with its stand-in SP group, as the trainer does:
    rank 0 takes the flow of its share of the window only (less RAFT work than sp 1; at this
    2-chunk window its decode is the same: its chunk plus the next share's first chunk),
    receives the next rank's cache gradients and sends nothing, and D's input is all-gathered."""
    cfg2 = load_config("tiny", [*SMALL, "parallel.sp_size=2"])
    sp2 = run_iteration(cfg2, world_size=2, trainable_dtype=torch.float32)
    gan1 = next(p for p in planned.phases if p.name == "generator_gan")  # sp 1
    gan2 = next(p for p in sp2.phases if p.name == "generator_gan")
    assert gan2.collectives.get("sp_recv", 0) > 0 and "sp_send" not in gan2.collectives
    assert gan2.collectives.get("sp_all_gather", 0) > 0
    assert gan2.flops.by_network["raft"] < gan1.flops.by_network["raft"]


def test_partitioned_teacher_states_and_all_gathers():
    """parallel.zero_stage.teacher: the ZeRO-3 teacher holds params*2/world (bf16) plus one gathered layer and
    all-gathers its parameters once per DMD micro step (CFG batched, no_grad); the replica holds all of it."""
    from mogan_ds.cli.launcher import REPO
    from mogan_ds.plan.memory import largest_layer_params
    from mogan_ds.plan.report import make_plan, summary
    from mogan_ds.train.roles import load_ds_config

    ds = load_ds_config(REPO / "ds_configs" / "zero3_bf16.json")
    bf16 = [*SMALL, "models.frozen_dtype=bf16", "train.batch_size=4"]  # world 2: gas 2
    part = make_plan(load_config("tiny", bf16), ds, 1, 2, "h100")
    repl = make_plan(load_config("tiny", [*bf16, "parallel.zero_stage.teacher=1"]), ds, 1, 2, "h100")
    assert part.run is repl.run  # the teacher's stage changes no traced figure
    teacher = part.run.modules["teacher"]
    params = sum(p.numel() for p in teacher.parameters())
    buffers = sum(b.numel() * b.element_size() for b in teacher.buffers())
    t_part = next(s for s in part.states if s.name == "teacher")
    t_repl = next(s for s in repl.states if s.name == "teacher")
    world = 2
    assert t_part.breakdown["params (partition)"] == params * 2 // world
    assert t_part.gpu_bytes == params * 2 // world + largest_layer_params(teacher) * 2 + buffers
    assert (t_part.stage, t_repl.stage, t_repl.gpu_bytes) == (3, 0, params * 2 + buffers)
    assert repl.state_bytes - part.state_bytes == t_repl.gpu_bytes - t_part.gpu_bytes > 0
    assert summary(part)["zero_stage"]["teacher"] == 3 and "teacher" not in summary(repl)["zero_stage"]
    forwards = sum(ph.engine_calls["teacher"].forwards * ph.repeats for ph in part.run.phases)
    assert forwards == part.run.gas == 2  # once per DMD micro step: cond + uncond in one batched call
    assert all(ph.engine_calls["teacher"].grad_forwards == 0 for ph in part.run.phases)
    assert part.comm_bytes["zero3_all_gather (teacher)"] == int(params * 2 * (world - 1) / world * forwards)
    assert "zero3_all_gather (teacher)" not in repl.comm_bytes
    # Parameters offloaded by the JSON: the partition moves to host memory, only the gathered layer stays.
    off = {**ds, "zero_optimization": {**ds["zero_optimization"], "offload_param": {"device": "cpu"}}}
    t_off = next(s for s in make_plan(load_config("tiny", bf16), off, 1, 2, "h100").states if s.name == "teacher")
    assert t_off.breakdown["params (partition)"] == 0 and t_off.host_bytes == params * 2 // world * 2
