"""Logistic GAN losses (eq. 4-5) and approximate R1/R2 (eq. 6-7) against hand computations."""

import math

import pytest
import torch

from mogan_ds.losses.gan import approx_r1r2, d_logistic_loss, g_logistic_loss


def sp(x):  # softplus by hand
    return math.log1p(math.exp(x))


def test_d_logistic_loss_by_hand():
    real = torch.tensor([2.0, -1.0])
    fake = torch.tensor([0.5, -3.0, 1.0])
    loss, logs = d_logistic_loss(real, fake)
    expected = (sp(-2.0) + sp(1.0)) / 2 + (sp(0.5) + sp(-3.0) + sp(1.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs["d_loss"] == pytest.approx(expected, rel=1e-6)
    assert logs["d_real_logit"] == pytest.approx(0.5) and logs["d_fake_logit"] == pytest.approx(-0.5)
    assert logs["d_accuracy"] == pytest.approx(2 / 5)  # real 2.0 and fake -3.0 are on the right side
    assert all(isinstance(v, float) for v in logs.values())


def test_g_logistic_loss_by_hand_and_gradient():
    fake = torch.tensor([0.5, -3.0], requires_grad=True)
    loss, logs = g_logistic_loss(fake)
    assert loss.item() == pytest.approx((sp(-0.5) + sp(3.0)) / 2, rel=1e-6)
    loss.backward()
    # d/dx softplus(-x) = -sigmoid(-x); mean over 2
    torch.testing.assert_close(fake.grad, -torch.sigmoid(-fake.detach()) / 2)
    assert logs["g_gan_loss"] == pytest.approx(loss.item())


class LinearD(torch.nn.Module):
    """D(x) = <w, x> + b per sample, with a call counter."""

    def __init__(self, shape):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        self.b = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return (x * self.w).flatten(1).sum(1) + self.b


def test_approx_r1r2_by_hand():
    shape = (3, 4)
    d = LinearD(shape)
    real = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    fake = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    sigma, r1, r2 = 0.1, 100.0, 10.0
    loss, logs = approx_r1r2(d, real, fake, sigma, r1, r2, generator=torch.Generator().manual_seed(7))
    # Same noise by hand: R1's draw comes first, then R2's.
    g = torch.Generator().manual_seed(7)
    n_real, n_fake = torch.randn(real.shape, generator=g), torch.randn(fake.shape, generator=g)
    w = d.w.detach()
    # D(x) - D(x + s n) = -s <w, n> for a linear D.
    gap_real = ((sigma * (n_real * w).flatten(1).sum(1)) ** 2).mean().item()
    gap_fake = ((sigma * (n_fake * w).flatten(1).sum(1)) ** 2).mean().item()
    assert logs["r1_gap"] == pytest.approx(gap_real, rel=1e-5)
    assert logs["r2_gap"] == pytest.approx(gap_fake, rel=1e-5)
    assert loss.item() == pytest.approx(r1 * gap_real + r2 * gap_fake, rel=1e-5)
    # The effective gradient-penalty weights lambda * sigma^2 are logged (100 * 0.01, 10 * 0.01).
    assert logs["r1_gp_weight"] == pytest.approx(1.0) and logs["r2_gp_weight"] == pytest.approx(0.1)
    loss.backward()
    # It trains D (w gets a gradient; b cancels in the difference) and never the inputs.
    assert d.w.grad.abs().sum() > 0 and d.b.grad.abs().item() < 1e-6
    assert fake.grad is None


def test_r1r2_weights_may_be_zero_and_skip_their_passes():
    shape = (5,)
    d = LinearD(shape)
    x = torch.randn(2, *shape)
    loss, logs = approx_r1r2(d, x, None, 0.01, r1=1.0, r2=0.0)
    assert d.calls == 2 and "r2_gap" not in logs and loss.item() > 0
    d.calls = 0
    loss, logs = approx_r1r2(d, None, x, 0.01, r1=0.0, r2=1.0)
    assert d.calls == 2 and "r1_gap" not in logs
    d.calls = 0
    loss, logs = approx_r1r2(d, x, x, 0.01, r1=0.0, r2=0.0)
    assert d.calls == 0 and loss.item() == 0.0 and logs == {"r_loss": 0.0, "r1_gp_weight": 0.0, "r2_gp_weight": 0.0}
    # Precomputed clean logits save the clean forward.
    d.calls = 0
    approx_r1r2(d, x, None, 0.01, r1=1.0, r2=0.0, real_logits=d(x))
    assert d.calls == 2  # the one above plus the noisy pass
    with pytest.raises(ValueError, match="r1 weight"):
        approx_r1r2(d, None, x, 0.01, r1=1.0, r2=0.0)


def test_r1_approximates_the_gradient_penalty():
    # E_n (D(x) - D(x + s n))^2 ~= s^2 ||grad D||^2 for small s: here D is quadratic.
    torch.manual_seed(0)
    x = torch.randn(4096, 8)
    d = lambda z: (z**2).sum(1)  # noqa: E731 - grad = 2x
    _, logs = approx_r1r2(d, x, None, sigma=1e-3, r1=1.0, r2=0.0, generator=torch.Generator().manual_seed(1))
    penalty = (1e-3) ** 2 * (2 * x).square().sum(1).mean().item()
    assert logs["r1_gap"] == pytest.approx(penalty, rel=0.1)
