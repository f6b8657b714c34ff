import torch

from mogan_ds.ema import ShardedEMA


def test_ema_tracks_swaps_and_round_trips():
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
