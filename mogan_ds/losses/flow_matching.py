"""Flow-matching loss of the fake score (paper eq. 3).

With x_t = (1 - s) x0 + s eps the oracle velocity is v = eps - x0; the fake score f_fake
is trained on detached generator samples x0 ~ G to predict it:

    L_fake = E_{t, eps} || f_fake(x_t, t) - (eps - x0) ||^2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import metric_names as M


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """MSE between a predicted velocity and the flow-matching target.

    Args:
        v_pred: predicted velocity, [B, C, T, H, W].
        x0: clean sample (detached generator output), same shape.
        eps: the noise x_t was built with, same shape.

    Returns:
        (mean squared error in fp32, {"fake_score_loss": float}).
    """
    target = (eps - x0).float()
    loss = F.mse_loss(v_pred.float(), target, reduction="mean")
    return loss, {M.FAKE_SCORE_LOSS: loss.item()}
