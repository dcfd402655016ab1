"""A two-component Gaussian mixture over per-sample losses: which samples look clean.

Networks fit correctly labelled samples before mislabelled ones, so early in training the losses
of a noisy data set are bimodal: a low mode of clean samples and a high one of mislabelled
samples. DivideMix (Li, Socher & Hoi, 2020) fits two Gaussians to the losses (scaled to [0, 1])
and calls a sample clean when the low component explains it with probability at least 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LossMixture", "fit_loss_mixture"]


@dataclass(frozen=True)
class LossMixture:
    """Two Gaussians over losses scaled to ``[0, 1]`` by ``low`` and ``high``; ``means[0]`` is
    the clean (lower) component."""

    low: float
    high: float
    means: Tensor
    variances: Tensor
    weights: Tensor

    def clean_probability(self, losses: Tensor) -> Tensor:
        """``P(clean | loss)`` of each loss (losses beyond the fitted range are clamped to it)."""
        x = ((losses.double().cpu() - self.low) / (self.high - self.low)).clamp(0, 1)
        log_density = (
            -0.5 * (x[:, None] - self.means) ** 2 / self.variances
            - 0.5 * torch.log(2 * math.pi * self.variances)
            + torch.log(self.weights)
        )
        return torch.softmax(log_density, dim=1)[:, 0].float()

    @property
    def clean_mean(self) -> float:
        return float(self.means[0]) * (self.high - self.low) + self.low

    @property
    def noisy_mean(self) -> float:
        return float(self.means[1]) * (self.high - self.low) + self.low


def fit_loss_mixture(
    losses: Tensor, *, iterations: int = 20, reg: float = 5e-4, min_separation: float = 2.0
) -> LossMixture | None:
    """Fit two Gaussians to ``losses`` by EM; ``None`` when the losses show no second mode.

    Args:
        losses: ``[N]`` finite per-sample losses.
        iterations: EM steps (DivideMix's scikit-learn fit stops within 10-20).
        reg: added to each variance (scikit-learn's ``reg_covar``; DivideMix uses 5e-4).
        min_separation: the means must lie this many times the mean of the two standard
            deviations apart to count as two populations; closer (a unimodal loss distribution),
            there is no noisy mode and the fit is ``None``.

    Example:
        >>> import torch
        >>> noise = torch.rand(100, generator=torch.Generator().manual_seed(0)) * 0.1
        >>> losses = torch.cat([torch.full((80,), 0.1), torch.full((20,), 2.3)]) + noise
        >>> mixture = fit_loss_mixture(losses)
        >>> int((mixture.clean_probability(losses) >= 0.5).sum()), round(mixture.noisy_mean, 1)
        (80, 2.3)
    """
    x = losses.detach().double().flatten().cpu()
    if x.numel() < 4:
        return None
    low, high = float(x.min()), float(x.max())
    if high - low < 1e-12:
        return None
    x = (x - low) / (high - low)
    means = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=torch.float64))
    variances = torch.full((2,), float(x.var()) / 4 + reg, dtype=torch.float64)
    weights = torch.full((2,), 0.5, dtype=torch.float64)
    for _ in range(iterations):
        log_density = (
            -0.5 * (x[:, None] - means) ** 2 / variances
            - 0.5 * torch.log(2 * math.pi * variances)
            + torch.log(weights)
        )
        responsibility = torch.softmax(log_density, dim=1)
        mass = responsibility.sum(0).clamp_min(1e-12)
        weights = mass / x.numel()
        means = (responsibility * x[:, None]).sum(0) / mass
        variances = (responsibility * (x[:, None] - means) ** 2).sum(0) / mass + reg
    order = means.argsort()
    means, variances, weights = means[order], variances[order], weights[order].clamp_min(1e-12)
    if float(means[1] - means[0]) < min_separation * float(variances.sqrt().mean()):
        return None
    return LossMixture(low, high, means, variances, weights)
