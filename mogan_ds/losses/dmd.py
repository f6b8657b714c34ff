"""DMD generator loss (paper eq. 1-2; DMD2 as public Wan DMD recipes implement it).

The DMD gradient of KL(p_fake || p_real) w.r.t. a generator sample x0 is
    grad = s_fake(x_t) - s_real(x_t)
which, in x0-prediction form and normalised per sample as in DMD (Yin et al.), is

    p_real = x0 - x0_real,   p_fake = x0 - x0_fake
    g      = (p_real - p_fake) / mean(|p_real|)          (mean over all but the batch dim)

The loss 0.5 * ||x0 - sg(x0 - g)||^2 has exactly g / N as its gradient w.r.t. x0, so
one backward pass pushes x0 towards the teacher's prediction and away from the fake
score's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import metric_names as M


def dmd_loss(
    x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, weight: float = 1.0
) -> tuple[torch.Tensor, dict]:
    """DMD generator loss.

    Args:
        x0: generator sample (with grad), [B, C, T, H, W] latents.
        x0_real: teacher's CFG x0 prediction at (x_t, t), no grad, same shape.
        x0_fake: fake score's x0 prediction at (x_t, t), no grad, same shape.
        weight: lambda_DMD.

    Returns:
        (weight * 0.5 * mse(x0, sg(x0 - g)) computed in fp64, logs) where logs holds the
        unweighted loss and the per-sample-normalised gradient's RMS (`dmd_grad_norm`).
    """
    with torch.no_grad():
        p_real = (x0 - x0_real).double()
        p_fake = (x0 - x0_fake).double()
        dims = tuple(range(1, x0.ndim))
        normaliser = p_real.abs().mean(dim=dims, keepdim=True)
        # A sample the teacher reproduces exactly (normaliser 0) carries no DMD signal: its
        # gradient is 0, not inf/NaN (nan_to_num alone would give +-1.8e308 and an inf loss).
        safe = torch.where(normaliser > 0, normaliser, torch.ones_like(normaliser))
        grad = torch.where(normaliser > 0, (p_real - p_fake) / safe, torch.zeros_like(p_real))
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        target = x0.double() - grad
    loss = 0.5 * F.mse_loss(x0.double(), target, reduction="mean")
    logs = {M.DMD_LOSS: loss.item(), M.DMD_GRAD_NORM: grad.pow(2).mean().sqrt().item()}
    return weight * loss, logs
