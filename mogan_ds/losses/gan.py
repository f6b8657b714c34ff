"""Motion-GAN losses (paper eq. 4-7): logistic GAN losses and approximate R1/R2.

Pure functions of logits (or of a discriminator callable); each returns ``(loss, logs)``
with `loss` a scalar tensor that carries the graph and `logs` a dict of detached floats.
The loss weights lambda_G / lambda_D are applied by the trainer.

Notation: D(m) is the discriminator's logit for a clip's motion input m (for
``gan.space=flow`` the motion tensor, or its latent encoding; for ``space=latent`` the
latents). softplus(x) = log(1 + e^x), so softplus(-D) = -log sigmoid(D).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import metric_names as M


def d_logistic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Discriminator loss, eq. 4::

        L_D = E_real[softplus(-D(m_real))] + E_fake[softplus(D(m_fake))]

    Args:
        real_logits: [B_real] logits of real clips.
        fake_logits: [B_fake] logits of (detached) generated clips.

    Returns:
        Scalar loss (fp32) and logs: d_loss, d_loss_real, d_loss_fake, d_real_logit,
        d_fake_logit (batch means) and d_accuracy (share of clips on the right side of 0).
    """
    real, fake = real_logits.float(), fake_logits.float()
    loss_real = F.softplus(-real).mean()
    loss_fake = F.softplus(fake).mean()
    loss = loss_real + loss_fake
    with torch.no_grad():
        correct = torch.cat([(real > 0).float(), (fake < 0).float()]).mean()
    logs = {
        M.D_LOSS: loss.item(),
        M.D_LOSS_REAL: loss_real.item(),
        M.D_LOSS_FAKE: loss_fake.item(),
        M.D_REAL_LOGIT: real.detach().mean().item(),
        M.D_FAKE_LOGIT: fake.detach().mean().item(),
        M.D_ACCURACY: correct.item(),
    }
    return loss, logs


def g_logistic_loss(fake_logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Generator loss, eq. 5 (non-saturating)::

        L_G = E_fake[softplus(-D(m_fake))]

    Args:
        fake_logits: [B] logits of generated clips, with the graph back to the generator.

    Returns:
        Scalar loss (fp32) and logs: g_gan_loss, g_fake_logit.
    """
    fake = fake_logits.float()
    loss = F.softplus(-fake).mean()
    return loss, {M.G_GAN_LOSS: loss.item(), M.G_FAKE_LOGIT: fake.detach().mean().item()}


def _perturbation_gap(
    d_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float,
    generator: torch.Generator | None,
    clean_logits: torch.Tensor | None,
) -> torch.Tensor:
    """mean_b (D(x_b) - D(x_b + sigma * n_b))^2 with n ~ N(0, I) of x's shape."""
    x = x.detach()  # the regulariser trains D only
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    clean = d_fn(x) if clean_logits is None else clean_logits
    noisy = d_fn(x + sigma * noise)
    diff = clean.float().reshape(clean.shape[0], -1) - noisy.float().reshape(noisy.shape[0], -1)
    return diff.square().sum(dim=1).mean()


def approx_r1r2(
    d_fn: Callable[[torch.Tensor], torch.Tensor],
    real_in: torch.Tensor | None,
    fake_in: torch.Tensor | None,
    sigma: float,
    r1: float,
    r2: float,
    generator: torch.Generator | None = None,
    *,
    real_logits: torch.Tensor | None = None,
    fake_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Approximate R1 / R2 (eq. 6-7; the finite-difference form of Seaweed APT)::

        L_R1 = lambda_R1 * E_real ||D(m) - D(m + sigma * N(0, I))||^2
        L_R2 = lambda_R2 * E_fake ||D(m) - D(m + sigma * N(0, I))||^2

    For small sigma, E_n (D(m) - D(m + sigma n))^2 ~= sigma^2 ||grad_m D(m)||^2, i.e. the
    R1 / R2 gradient penalties of Roth et al. without double backward.

    Args:
        d_fn: the discriminator as a callable, inputs [B, ...] -> logits [B].
        real_in, fake_in: D inputs [B, ...] of real / generated clips; detached here (the
            penalty trains D only). May be None when the matching weight is 0.
        sigma: noise std (``gan.sigma``).
        r1, r2: lambda_R1, lambda_R2 (``gan.r1``, ``gan.r2``). A weight of 0 skips that
            term's forward passes entirely.
        generator: torch.Generator on the inputs' device for the noise (reproducibility).
        real_logits, fake_logits: D's logits on the clean inputs when the caller already
            has them with graph (from the logistic loss); saves one forward each.

    Returns:
        Scalar loss r1 * L_R1' + r2 * L_R2' (fp32, zero when both weights are 0) and logs
        r1_gap / r2_gap (the unweighted mean squared logit gaps, when computed), r_loss, and
        r1_gp_weight / r2_gp_weight = lambda * sigma^2, the effective gradient-penalty weights.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if r1 < 0 or r2 < 0:
        raise ValueError(f"R1/R2 weights must be >= 0, got {r1}, {r2}")
    ref = real_in if real_in is not None else fake_in
    loss = torch.zeros((), device=ref.device if ref is not None else None)
    logs: dict[str, float] = {}
    for name, key, gp_key, weight, x, clean in (
        ("r1", M.R1_GAP, M.R1_GP_WEIGHT, r1, real_in, real_logits),
        ("r2", M.R2_GAP, M.R2_GP_WEIGHT, r2, fake_in, fake_logits),
    ):
        # To first order the penalty is weight * sigma^2 * |grad D|^2: log that product, the
        # number that is comparable across (lambda, sigma) pairs.
        logs[gp_key] = weight * sigma**2
        if weight == 0:
            continue
        if x is None:
            raise ValueError(f"{name} weight is {weight} but no input was given")
        gap = _perturbation_gap(d_fn, x, sigma, generator, clean)
        loss = loss + weight * gap
        logs[key] = gap.item()
    logs[M.R_LOSS] = loss.item()
    return loss, logs
