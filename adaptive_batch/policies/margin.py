"""The margin loss DBA and EDBA score gradient subsets with (seed 003, equation 1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["margin_loss"]


def margin_loss(loss_delta: float, grad_norms: Tensor, grad_ema: float, eps: float) -> Tensor:
    """``| (M - M_ema) / (G - G_ema) - 1 |`` for each gradient norm ``G``.

    ``inf`` where the denominator is ~0 (``|G - G_ema| <= eps * max(G_ema, 1e-12)``): the score
    is undefined there, and such a subset is never chosen.

    Example:
        >>> import torch
        >>> margin_loss(0.5, torch.tensor([1.5, 1.0, 2.0]), 1.0, 1e-6).tolist()
        [0.0, inf, 0.5]
    """
    denominator = grad_norms - grad_ema
    valid = denominator.abs() > eps * max(grad_ema, 1e-12)
    slope = loss_delta / torch.where(valid, denominator, torch.ones_like(denominator))
    return torch.where(valid, (slope - 1.0).abs(), torch.full_like(slope, math.inf))
