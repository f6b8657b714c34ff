import torch

from mogan_ds.losses.dmd import dmd_loss
from mogan_ds.losses.flow_matching import flow_matching_loss


def test_dmd_loss_value_and_gradient_by_hand():
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 2, 4, 4, requires_grad=True)
    real, fake = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    loss, logs = dmd_loss(x0, real, fake, weight=2.0)
    # by hand, sample by sample
    g = torch.empty_like(x0)
    for b in range(2):
        p_real = x0[b].detach() - real[b]
        p_fake = x0[b].detach() - fake[b]
        g[b] = (p_real - p_fake) / p_real.abs().mean()
    n = x0.numel()
    expected = 2.0 * 0.5 * (g.double() ** 2).sum() / n
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert abs(logs["dmd_loss"] - expected.item() / 2.0) < 1e-6
    loss.backward()
    # d/dx0 of 0.5*mean((x0 - sg(x0 - g))^2) * w = w * g / N
    assert torch.allclose(x0.grad, (2.0 * g / n).float(), atol=1e-7)


def test_dmd_gradient_points_from_fake_to_real():
    x0 = torch.zeros(1, 1, 1, 2, 2, requires_grad=True)
    real = torch.ones(1, 1, 1, 2, 2)  # teacher says: move up
    fake = -torch.ones(1, 1, 1, 2, 2)
    loss, _ = dmd_loss(x0, real, fake)
    loss.backward()
    assert (x0.grad < 0).all()  # gradient descent moves x0 towards the teacher's prediction


def test_dmd_degenerate_sample_does_not_nan_the_batch():
    x0 = torch.randn(2, 1, 1, 2, 2, requires_grad=True)
    real = x0.detach().clone()
    real[1] += 1.0  # sample 0: teacher == sample -> 0/0
    loss, _ = dmd_loss(x0, real, torch.randn(2, 1, 1, 2, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x0.grad).all()
    assert (x0.grad[0] == 0).all() and (x0.grad[1] != 0).any()


def test_flow_matching_loss_by_hand():
    torch.manual_seed(1)
    x0, eps = torch.randn(2, 4, 1, 3, 3), torch.randn(2, 4, 1, 3, 3)
    v = torch.randn(2, 4, 1, 3, 3, requires_grad=True)
    loss, logs = flow_matching_loss(v, x0, eps)
    expected = ((v.detach() - (eps - x0)) ** 2).mean()
    assert torch.allclose(loss, expected) and abs(logs["fake_score_loss"] - expected.item()) < 1e-6
    loss.backward()
    assert torch.allclose(v.grad, 2 * (v.detach() - (eps - x0)) / v.numel())
