"""`python -m mogan_ds plan`: the SDPA FLOP formula, the live-bytes tracker, and the planner
against the same phases run for real on CPU (tiny recipe, one process, no DeepSpeed)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from mogan_ds.config import load_config
from mogan_ds.plan.flops import CPU_SDPA, CPU_SDPA_BACKWARD
from mogan_ds.plan.memory import LiveBytes
from mogan_ds.plan.runner import flop_pass, memory_pass, prepare, run_iteration

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
        x = torch.empty(mib // 4)          # 1 MiB fp32
        y = x * 2                          # +1 MiB
        z = y.view(-1)[: mib // 8]         # a view: no new storage
        del x
        w = torch.cat([y, y])              # +2 MiB -> peak 3 MiB with y (x freed)
        assert mem.live == 3 * mib
        del w, z
        assert mem.live == mib
    assert mem.peak == 3 * mib


def test_live_bytes_counts_a_linear_backward():
    # Linear(256 -> 512), batch 64, fp32: activations and gradients of known size.
    lin = torch.nn.Linear(256, 512)
    x = torch.randn(64, 256, requires_grad=True)
    with LiveBytes() as mem:
        y = lin(x)                         # 64*512*4 = 128 KiB
        loss = y.square().sum()            # y^2 (128 KiB) + scalar
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
    """The same phases on real, randomly initialised CPU modules of the same architectures."""
    torch.manual_seed(0)
    prep = prepare(tiny_cfg, world_size=1, trainable_dtype=torch.float32, device="cpu")
    flop_pass(prep)
    memory_pass(prep)
    return prep


def test_planner_flops_equal_real_cpu_run(planned, real):
    assert [p.name for p in real.phases] == [p.name for p in planned.phases]
    for fake_phase, real_phase in zip(planned.phases, real.phases):
        assert real_phase.flops.total > 0
        assert fake_phase.flops.total == real_phase.flops.total, fake_phase.name
        assert fake_phase.flops.by_network == real_phase.flops.by_network, fake_phase.name
    nets = set().union(*(p.flops.by_network for p in planned.phases))
    assert {"generator", "teacher", "fake_score", "vae_decode", "raft", "vae_encode", "discriminator"} <= nets


def test_planner_activation_peak_matches_real_tensors(planned, real):
    # The same tracker on real tensors (CPU has no allocator statistics): fake shapes and
    # lifetimes must give the peaks real tensors give.
    for fake_phase, real_phase in zip(planned.phases, real.phases):
        assert real_phase.act_peak_bytes > 0
        assert abs(fake_phase.act_peak_bytes - real_phase.act_peak_bytes) <= 0.15 * real_phase.act_peak_bytes, fake_phase.name


def test_cli_last_line_is_json(capsys):
    from mogan_ds.__main__ import main

    rc = main(["plan", "--config", "tiny", "--ds_config", "ds_configs/zero3_bf16.json", "--nodes", "1",
               "--gpus-per-node", "2", "--gpu", "h100", *SMALL])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["fits"] is True
    assert summary["iteration_tflop_per_rank"] > 0
    assert set(summary["phase_tflop"]) == {"generator_dmd", "fake_score", "generator_gan", "discriminator"}
    assert any(line.startswith("fits:") for line in lines)
