"""The planner with LoRA roles (`models.lora.<role>`): the same phases run for real on CPU give the planned
FLOPs and activation peaks; the teacher on the fake score's shared base computes (and is charged) what a
separate teacher computes; model states are the adapters' optimizer states over a frozen base partition,
with no second copy for the teacher; gradients are reduce-scattered for the adapters only; and at 14B on
one 8-GPU node the model states per rank drop more than 5x against full fine-tuning."""

from __future__ import annotations

import math

import pytest
import torch

from mogan_ds.config import load_config
from mogan_ds.plan.runner import prepare, run_iteration, trace_pass

SMALL = ["video.num_frames=5", "gan.window=2", "dmd.critic_updates=1", "gan.raft_iters=2", "gan.raft_pairs_per_chunk=4"]
LORA = [
    f"models.lora.{r}.{k}={v}"
    for r in ("generator", "fake_score", "discriminator")
    for k, v in (("enabled", "true"), ("rank", 4), ("alpha", 8))
]
ROLES = ("generator", "fake_score", "discriminator")


@pytest.fixture(scope="module")
def full():
    return run_iteration(load_config("tiny", SMALL), world_size=1, trainable_dtype=torch.float32)


@pytest.fixture(scope="module")
def lora():
    return run_iteration(load_config("tiny", [*SMALL, *LORA]), world_size=1, trainable_dtype=torch.float32)


def test_lora_plan_equals_a_real_cpu_run_and_charges_the_teacher(lora, full):
    torch.manual_seed(0)
    prep = prepare(load_config("tiny", [*SMALL, *LORA]), world_size=1, trainable_dtype=torch.float32, device="cpu")
    assert trace_pass(prep, memo=False) is None  # real tensors, every block run
    for planned, real in zip(lora.phases, prep.phases, strict=True):
        assert planned.flops.total == real.flops.total > 0, planned.name
        assert planned.flops.by_network == real.flops.by_network, planned.name
        assert abs(planned.act_peak_bytes - real.act_peak_bytes) <= 0.15 * real.act_peak_bytes, planned.name
    by_phase = {p.name: p for p in lora.phases}
    full_phase = {p.name: p for p in full.phases}
    dmd, dmd_full = by_phase["generator_dmd"], full_phase["generator_dmd"]
    # the teacher (the fake score's module, adapter off) does exactly a separate teacher's work, under its own name
    assert dmd.flops.by_network["teacher"] == dmd_full.flops.by_network["teacher"] > 0
    assert dmd.engine_calls["teacher"].forwards == dmd_full.engine_calls["teacher"].forwards == 1
    # its forward runs the fake score's module: the fake score's ZeRO-3 gathers count it
    assert dmd.engine_calls["fake_score"].forwards == dmd_full.engine_calls["fake_score"].forwards + 1
    # frozen bases compute no weight gradients: less backward work for every LoRA role
    for phase, net in (
        ("generator_dmd", "generator"),
        ("fake_score", "fake_score"),
        ("discriminator", "discriminator"),
    ):
        assert by_phase[phase].flops.by_network[net] < full_phase[phase].flops.by_network[net], phase


def test_lora_model_states_and_traffic():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from mogan_ds.cli.launcher import REPO
    from mogan_ds.plan.memory import largest_layer_params
    from mogan_ds.plan.report import make_plan, summary
    from mogan_ds.train.roles import load_ds_config

    ds = load_ds_config(REPO / "ds_configs" / "zero3_bf16.json")
    bf16 = [*SMALL, "models.frozen_dtype=bf16", "train.batch_size=4"]  # world 2: gas 2
    lp = make_plan(load_config("tiny", [*bf16, *LORA]), ds, 1, 2, "h100")
    fp = make_plan(load_config("tiny", bf16), ds, 1, 2, "h100")
    world = 2
    states = {s.name: s for s in lp.states}
    for role in ROLES:
        module = lp.run.modules[role]
        adapters = sum(p.numel() for p in module.parameters() if p.requires_grad)
        base = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
        gpu = estimate_zero3_model_states_mem_needs(
            adapters, largest_layer_params(module), world, 1, cpu_offload=False, cpu_offload_params=False
        )[1]
        assert states[role].gpu_bytes == gpu + math.ceil(base / world), role
        assert states[role].breakdown["frozen base (partition)"] == math.ceil(base / world)
        assert summary(lp)["lora_trainable_params"][role] == adapters
        updates = sum(ph.engine_calls[role].updates * ph.repeats for ph in lp.run.phases)
        assert lp.comm_bytes[f"zero3_reduce_scatter ({role})"] == int(adapters * 2 * (world - 1) / world * updates)
    # one base for the fake score and the teacher: the teacher holds nothing and gathers nothing of its own
    assert states["teacher"].gpu_bytes == 0 and "zero3_all_gather (teacher)" not in lp.comm_bytes
    assert next(s for s in fp.states if s.name == "teacher").gpu_bytes > 0
    assert lp.state_bytes < fp.state_bytes


def test_14b_model_states_per_rank_drop_more_than_5x_on_one_node():
    """The 14B recipe on 1 x 8 GPUs, networks on the meta device (no trace): full fine-tuning vs every role a
    rank-64 adapter with the fake score on the teacher's base. Model states per rank, the planner's own figures."""
    from mogan_ds.cli.launcher import REPO
    from mogan_ds.plan.comm import PlanTopology
    from mogan_ds.plan.report import model_states
    from mogan_ds.plan.runner import build_plan_networks
    from mogan_ds.train.roles import load_ds_config, plan_roles

    ds = load_ds_config(REPO / "ds_configs" / "zero3_bf16.json")
    totals = {}
    for name, extra in (("full", []), ("lora", [f"models.lora.{r}.enabled=true" for r in ROLES])):
        cfg = load_config("wan2.1-t2v-14b", extra)
        roles = plan_roles(cfg, ds, PlanTopology(8, 1))
        nets = build_plan_networks(cfg, torch.bfloat16, "meta")
        states = model_states(roles, nets, [r for r in ROLES if r in nets], 8, 1)
        totals[name] = sum(s.gpu_bytes for s in states)
        if name == "lora":
            adapters = sum(p.numel() for p in nets["generator"].parameters() if p.requires_grad)
            assert 250e6 < adapters < 350e6  # rank 64 on 40 blocks x 10 projections of width 5120 / 13824
            assert {s.name: s.gpu_bytes for s in states}["teacher"] == 0
    assert totals["full"] / totals["lora"] > 5, totals
