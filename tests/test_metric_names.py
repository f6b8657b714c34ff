"""Metric names: what the progress bar reads is what the losses log (one set of constants)."""

import torch

from mogan_ds import metric_names as M
from mogan_ds.losses.dmd import dmd_loss
from mogan_ds.losses.flow_matching import flow_matching_loss
from mogan_ds.losses.gan import approx_r1r2, d_logistic_loss, g_logistic_loss
from mogan_ds.train.metrics import MetricsLogger


def _one_step_of_loss_logs() -> dict:
    """The logs of the four phases' losses, called as the trainer calls them."""
    g = torch.Generator().manual_seed(0)
    x0, real, fake = (torch.randn(2, 4, 3, 2, 2, generator=g) for _ in range(3))
    logs = dmd_loss(x0.requires_grad_(), real, fake)[1]
    logs |= flow_matching_loss(torch.randn(2, 4, 3, 2, 2, generator=g), x0.detach(), real)[1]
    logs |= g_logistic_loss(torch.randn(2, generator=g))[1]
    d_real, d_fake = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    real_logits, fake_logits = d_real.sum(1), d_fake.sum(1)
    logs |= d_logistic_loss(real_logits, fake_logits)[1]
    logs |= approx_r1r2(
        lambda m: m.sum(1), d_real, d_fake, 0.1, 1.0, 1.0, generator=g, real_logits=real_logits, fake_logits=fake_logits
    )[1]
    return logs


def test_every_progress_bar_name_is_logged_by_a_loss():
    logs = _one_step_of_loss_logs()
    assert set(M.PROGRESS_BAR) <= set(logs)
    assert {M.G_GAN_LOSS, M.D_LOSS, M.R1_GAP, M.R2_GAP, M.DMD_GRAD_NORM} <= set(logs)


def test_progress_bar_shows_the_gan_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("MOGAN_PROGRESS", "1")  # a bar even without a terminal
    logger = MetricsLogger(tmp_path, {}, True, total_steps=1, start_step=0, wandb_mode="disabled")
    try:
        logger.log(1, _one_step_of_loss_logs())
        shown = {item.split("=")[0].strip() for item in logger._bar.postfix.split(",")}
    finally:
        logger.close()
    # It used to ask for gan_g_loss / gan_d_loss, which nothing logs: the GAN never showed.
    assert shown == set(M.PROGRESS_BAR)
