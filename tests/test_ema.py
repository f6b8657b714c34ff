"""The EMA follows the optimizer's fp32 master weights, and the export writes them at fp32.

With a bf16 engine and a tiny lr the bf16 compute copy does not move at all (each Adam
update ~lr is far below bf16's resolution at |w| ~ 1), while the fp32 masters do: an EMA
or an export read from the bf16 copy would miss the whole of training.
"""

import pytest
import torch

from mogan_ds.train.ema import ShardedEMA

STEPS, LR, DECAY = 4, 1e-5, 0.5


def test_ema_tracks_swaps_and_round_trips():
    # An fp32 module without an engine: the parameter is its own master.
    lin = torch.nn.Linear(3, 2)
    ema = ShardedEMA(lin, decay=0.5)
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(2.0)
    ema.update()
    assert torch.allclose(ema.shadow[0], w0 + 1.0)  # 0.5*w0 + 0.5*(w0+2)
    live = lin.weight.detach().clone()
    with ema.swapped_in():
        assert torch.allclose(lin.weight, w0 + 1.0)
    assert torch.equal(lin.weight, live)
    other = ShardedEMA(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and torch.equal(other.shadow[0], ema.shadow[0])


def _bf16_engine(stage: int):
    import deepspeed

    from mogan_ds.parallel import init_distributed

    init_distributed()  # a world of one (gloo on DeepSpeed's CPU accelerator)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(1.0, 0.1)  # |w| ~ 1: bf16 resolution 2^-7, Adam's update ~ lr = 1e-5
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.0, 0.999], "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    return engine


def _full_masters(module):
    from deepspeed.utils import safe_get_full_fp32_param

    # DeepSpeed's own accessor, independent of mogan_ds.checkpoint.master_weights.
    return [safe_get_full_fp32_param(p).detach().clone() for p in module.parameters()]


def _compute_copy(module):
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("stage", [3, 2])
def test_ema_follows_fp32_masters_of_a_bf16_engine(stage, tmp_path):
    from mogan_ds.checkpoint.export import full_fp32_state_dict

    engine = _bf16_engine(stage)
    module = engine.module
    ema = ShardedEMA(module, DECAY)
    bf16_before = _compute_copy(module)
    assert all(w.dtype == torch.bfloat16 for w in bf16_before)
    expected = _full_masters(module)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(4, 32, generator=gen).to(torch.bfloat16)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
        ema.update()
        expected = [DECAY * e + (1 - DECAY) * m for e, m in zip(expected, _full_masters(module))]
    masters = _full_masters(module)

    # The premise: the bf16 copy has not moved, the fp32 masters have.
    assert all(torch.equal(a, b) for a, b in zip(bf16_before, _compute_copy(module)))
    assert all((m - b.float()).abs().max() > LR for m, b in zip(masters, bf16_before))
    # The EMA is the hand-computed EMA of the masters, to fp32 rounding (not bf16's 4e-3 at |w| ~ 1).
    for s, e in zip(ema.shadow, expected):
        torch.testing.assert_close(s, e.flatten(), rtol=0, atol=1e-6)
        assert (s - e.flatten()).abs().max() < (e.flatten() - e.flatten().bfloat16().float()).abs().max()

    # Export reads the masters at fp32: without the EMA the masters, with it the EMA.
    names = [n for n, _ in module.named_parameters()]
    state = full_fp32_state_dict(module)
    for n, m in zip(names, masters):
        assert state[n].dtype == torch.float32 and torch.equal(state[n], m)
    with ema.swapped_in():
        state = full_fp32_state_dict(module)
    for n, e in zip(names, expected):
        torch.testing.assert_close(state[n], e, rtol=0, atol=1e-6)
    # ... and the block leaves the masters (and the compute copy) exactly as they were.
    assert all(torch.equal(a, b) for a, b in zip(masters, _full_masters(module)))
    assert all(torch.equal(a, b) for a, b in zip(bf16_before, _compute_copy(module)))

    # Checkpoint round trip of the EMA shard.
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    other = ShardedEMA(module, 0.9)
    other.load_state_dict(torch.load(tmp_path / "ema.pt"))
    assert other.decay == DECAY and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))


def test_bf16_at_zero0_is_refused_not_averaged_in_bf16():
    # DeepSpeed keeps that master inside FP16_UnfusedOptimizer, out of reach per parameter.
    engine = _bf16_engine(0)
    with pytest.raises(ValueError, match="ZeRO stage >= 1"):
        ShardedEMA(engine.module, DECAY)
