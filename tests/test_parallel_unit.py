"""Single-process tests of mogan_ds.parallel: layout, plans, hooks, errors, ZeRO fixups, world-1 topology.

Multi-rank numerics (SP=2 and DP=2 parity against a reference) are in
test_sequence_parallel.py, through the real launcher.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from mogan_ds.cli.launcher import launch_env
from mogan_ds.models.tiny import TINY_TRANSFORMER
from mogan_ds.parallel import (
    Gather,
    ModulePlan,
    Shard,
    UlyssesWanAttnProcessor,
    configure_attention,
    parallelize_module,
    parallelize_wan,
    plan_from_cp_plan,
    resolve_attention_backend,
    sp_dp_layout,
    wan_plan,
    zero_config_fixups,
)


class StubTopo:
    """The attributes the hooks read; no process group (tests stop before any collective)."""

    def __init__(self, sp_size: int, sp_rank: int = 0):
        self.sp_size, self.sp_rank, self.sp_group = sp_size, sp_rank, None


def tiny_wan(**overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**{**TINY_TRANSFORMER, **overrides})


def wan_inputs(frames=3, height=8, width=8, batch=1):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 16, frames, height, width, generator=g),
        torch.tensor([500.0] * batch),
        torch.randn(batch, 8, TINY_TRANSFORMER["text_dim"], generator=g),
    )


# --------------------------------------------------------------------------- layout


def test_layout_sp_groups_are_contiguous_blocks():
    sp, dp = sp_dp_layout(8, 2)
    assert sp == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dp == [[0, 2, 4, 6], [1, 3, 5, 7]]
    sp, dp = sp_dp_layout(16, 8)  # one SP group per 8-GPU node
    assert sp == [list(range(8)), list(range(8, 16))]
    assert dp[3] == [3, 11]
    assert sp_dp_layout(4, 1) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])


def test_layout_rejects_sp_not_dividing_world():
    with pytest.raises(ValueError, match="sp_size=4 does not divide the world size 6"):
        sp_dp_layout(6, 4)


# --------------------------------------------------------------------------- plans


def test_wan_plan_is_the_models_cp_plan():
    plan = wan_plan(tiny_wan())
    assert plan["rope"] == ModulePlan(outputs={0: Shard(1, 4), 1: Shard(1, 4)})
    assert plan["blocks.0"] == ModulePlan(inputs={"hidden_states": Shard(1, 3)})
    assert plan["proj_out"] == ModulePlan(outputs={0: Gather(1, 3)})
    # Wan 2.2's per-token timesteps: only 2-dim timesteps are sharded.
    assert plan[""] == ModulePlan(inputs={"timestep": Shard(1, 2)})


def test_wan_plan_with_prefix_and_without_gather():
    plan = wan_plan(tiny_wan(), prefix="backbone", gather_output=False)
    assert set(plan) == {"backbone.rope", "backbone.blocks.0", "backbone"}


def test_plan_rejects_unknown_specs():
    from diffusers.models._modeling_parallel import ContextParallelInput

    with pytest.raises(ValueError, match="unsupported spec"):
        plan_from_cp_plan({"proj_out": 3})
    with pytest.raises(ValueError, match="split_output needs an integer output index"):
        plan_from_cp_plan({"rope": {"x": ContextParallelInput(split_dim=1, split_output=True)}})


class Toy(nn.Module):
    class Part(nn.Module):
        def forward(self, x, scale=None):
            self.seen = x
            return x * 2, x + 1

    def __init__(self):
        super().__init__()
        self.a = Toy.Part()
        self.heads = nn.ModuleList(Toy.Part() for _ in range(3))


def test_shard_hooks_give_this_ranks_chunk_by_name_index_and_output():
    toy = Toy()
    handle = parallelize_module(
        toy, {"a": ModulePlan(inputs={"x": Shard(1)}, outputs={1: Shard(2)})}, StubTopo(sp_size=2, sp_rank=1)
    )
    assert handle.num_hooks == 2
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    for call in (lambda: toy.a(x), lambda: toy.a(x=x)):  # positional and keyword
        doubled, plus = call()
        assert torch.equal(toy.a.seen, x[:, 2:])
        assert torch.equal(doubled, x[:, 2:] * 2)  # output 0 untouched
        assert torch.equal(plus, (x[:, 2:] + 1)[:, :, 3:])  # output 1 sharded along dim 2
    handle.remove()
    toy.a(x)
    assert torch.equal(toy.a.seen, x)


def test_expected_dims_mismatch_leaves_tensor_replicated():
    toy = Toy()
    parallelize_module(toy, {"a": {"x": Shard(1, expected_dims=3)}}, StubTopo(2, 1))
    x = torch.ones(4, 6)
    toy.a(x)
    assert toy.a.seen.shape == (4, 6)


def test_wildcard_hooks_every_head_and_unknown_paths_fail():
    toy = Toy()
    handle = parallelize_module(toy, {"heads.*": ModulePlan(inputs={0: Gather(1)})}, StubTopo(2))
    assert handle.num_hooks == 3
    with pytest.raises(ValueError, match="'tails.\\*' matches no submodule"):
        parallelize_module(Toy(), {"tails.*": ModulePlan(inputs={0: Gather(1)})}, StubTopo(2))
    with pytest.raises(RuntimeError, match="already carries sequence-parallel hooks"):
        parallelize_module(toy, {"heads.0": ModulePlan(inputs={0: Shard(1)})}, StubTopo(2))


# --------------------------------------------------------------------------- Wan


def test_token_count_not_divisible_by_sp_names_the_sizes():
    model = tiny_wan()
    parallelize_wan(model, StubTopo(sp_size=2))
    x, t, text = wan_inputs(frames=1, height=6, width=6)  # 1 * 3 * 3 = 9 tokens
    with pytest.raises(ValueError, match=r"has 9 tokens along dim 1 .* not divisible by sp_size=2"):
        model(x, t, text)


def test_sp_must_divide_heads():
    with pytest.raises(ValueError, match="sp_size=3 does not divide the 4 attention heads"):
        parallelize_wan(tiny_wan(), StubTopo(sp_size=3))


def test_parallelize_wan_installs_and_removes():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = tiny_wan()
    handle = parallelize_wan(model, StubTopo(sp_size=2))
    n = TINY_TRANSFORMER["num_layers"]
    assert handle.num_processors == n
    assert handle.num_hooks == 4  # rope out, blocks.0 in, proj_out out, root in (timestep)
    assert all(isinstance(b.attn1.processor, UlyssesWanAttnProcessor) for b in model.blocks)
    assert all(isinstance(b.attn2.processor, WanAttnProcessor) for b in model.blocks)  # cross-attn untouched
    with pytest.raises(RuntimeError, match="already"):
        parallelize_wan(model, StubTopo(sp_size=2))
    handle.remove()
    assert all(isinstance(b.attn1.processor, WanAttnProcessor) for b in model.blocks)
    assert not model.blocks[0]._forward_pre_hooks and not model.proj_out._forward_hooks
    parallelize_wan(model, StubTopo(sp_size=2)).remove()  # can be applied again after removal


def test_sp1_installs_nothing():
    model = tiny_wan()
    x, t, text = wan_inputs()
    before = model(x, t, text).sample
    handle = parallelize_wan(model, StubTopo(sp_size=1))
    assert handle.num_hooks == 0 and handle.num_processors == 0
    assert torch.equal(model(x, t, text).sample, before)


def test_attention_backend_reaches_ulysses_processors():
    from diffusers.models.attention_dispatch import AttentionBackendName

    model = tiny_wan()
    model.set_attention_backend("native")  # set before: carried over to the new processors
    parallelize_wan(model, StubTopo(sp_size=2))
    assert model.blocks[0].attn1.processor._attention_backend == AttentionBackendName.NATIVE
    assert configure_attention(model, "auto") == "native"  # CPU: no flash
    assert configure_attention(model, "native") == "native"
    for b in model.blocks:
        assert b.attn1.processor._attention_backend == AttentionBackendName.NATIVE
        assert b.attn1.processor._parallel_config is None  # diffusers' own CP stays off


def test_configure_attention_on_a_wrapper_module():
    from diffusers.models.attention_dispatch import AttentionBackendName

    wrapper = nn.Module()
    wrapper.backbone = tiny_wan(num_layers=1)
    assert configure_attention(wrapper, "native") == "native"
    assert wrapper.backbone.blocks[0].attn1.processor._attention_backend == AttentionBackendName.NATIVE
    with pytest.raises(ValueError, match="contains no diffusers model"):
        configure_attention(nn.Linear(2, 2), "native")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_attention_backend("sdpa")


# --------------------------------------------------------------------------- ZeRO fixups


def _cfg(**zero):
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, **zero}}


def test_fixups_sp1_is_a_copy():
    cfg = _cfg(reduce_scatter=False)
    out = zero_config_fixups(cfg, StubTopo(1))
    assert out == cfg and out is not cfg and out["zero_optimization"] is not cfg["zero_optimization"]


def test_fixups_sp2_forces_reduce_scatter_without_mutating_input(caplog):
    cfg = _cfg(reduce_scatter=False)
    with caplog.at_level("WARNING"):
        out = zero_config_fixups(cfg, StubTopo(2))
    assert out["zero_optimization"]["reduce_scatter"] is True
    assert cfg["zero_optimization"]["reduce_scatter"] is False
    assert "reduce_scatter=false overridden" in caplog.text
    assert zero_config_fixups(_cfg(), StubTopo(2))["zero_optimization"]["reduce_scatter"] is True


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"zero_optimization": {"stage": 2}}, "stage=2 with parallel.sp_size=2"),
        ({}, "stage=0 with parallel.sp_size=2"),
        (_cfg(zero_quantized_gradients=True), "zero_quantized_gradients"),
        ({**_cfg(), "gradient_predivide_factor": 2.0}, "gradient_predivide_factor"),
    ],
)
def test_fixups_reject_reductions_that_sum_over_sp(cfg, match):
    with pytest.raises(ValueError, match=match):
        zero_config_fixups(cfg, StubTopo(2))
    zero_config_fixups(cfg, StubTopo(2), trainable=False)  # a frozen engine never reduces gradients


@pytest.mark.parametrize("key", ["sequence_parallel_size", "data_parallel_size"])
def test_fixups_reject_deepspeed_mesh_keys(key):
    with pytest.raises(ValueError, match=f"'{key}' selects DeepSpeed's device-mesh path"):
        zero_config_fixups({**_cfg(), key: 1}, StubTopo(1))


# --------------------------------------------------------------------------- world 1, no launcher

WORLD1 = textwrap.dedent(
    """
    import json, sys, torch, deepspeed
    from mogan_ds.models.tiny import TINY_TRANSFORMER
    from mogan_ds.parallel import Topology, get_topology, parallelize_wan, zero_config_fixups
    from diffusers import WanTransformer3DModel

    topo = Topology.from_world(1)
    out = {
        "same_object": Topology.from_world(1) is topo and get_topology() is topo,
        "sizes": [topo.world_size, topo.rank, topo.sp_size, topo.dp_size, topo.sp_rank, topo.dp_rank],
        "mpu": [topo.get_data_parallel_world_size(), topo.get_sequence_parallel_world_size(),
                topo.get_sequence_data_parallel_world_size(), topo.get_model_parallel_world_size(),
                torch.distributed.get_world_size(topo.get_data_parallel_group())],
        "backend": torch.distributed.get_backend(),
    }
    try:
        Topology.from_world(2)
        out["other_sp"] = "no error"
    except RuntimeError as e:
        out["other_sp"] = str(e)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY_TRANSFORMER)
    parallelize_wan(model, topo)
    cfg = zero_config_fixups({"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
                              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}, topo)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=cfg, mpu=topo)
    before = {n: p.ds_tensor.clone() for n, p in engine.module.named_parameters()}
    x = torch.randn(1, 16, 3, 8, 8)
    loss = engine(x, torch.tensor([500.0]), torch.randn(1, 8, TINY_TRANSFORMER["text_dim"])).sample.square().mean()
    engine.backward(loss)
    engine.step()
    out["changed"] = sum(not torch.equal(before[n], p.ds_tensor) for n, p in engine.module.named_parameters())
    out["params"] = len(before)
    out["train_batch_size"] = engine.train_batch_size()
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_world1_topology_and_zero3_engine_without_launcher(repo_root):
    env = launch_env({"DS_ACCELERATOR": "cpu"})
    proc = subprocess.run(
        [sys.executable, "-c", WORLD1], cwd=repo_root, env=env, capture_output=True, text=True, timeout=600
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["same_object"]
    assert out["sizes"] == [1, 0, 1, 1, 0, 0]
    assert out["mpu"] == [1, 1, 1, 1, 1]
    assert out["backend"] == "gloo"
    assert "already built with sp_size=1" in out["other_sp"]
    assert out["train_batch_size"] == 1
    assert out["changed"] > out["params"] // 2  # the step moved (nearly) every parameter


def test_started_jobs_do_not_inherit_this_process_rendezvous(monkeypatch):
    # An in-process trainer leaves MASTER_PORT & co. set; a child reusing them hits EADDRINUSE.
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)
    env = launch_env({"EXTRA": "1"})
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(env)
    assert env["EXTRA"] == "1" and env["OMP_WAIT_POLICY"] and env["PYTHONPATH"]
