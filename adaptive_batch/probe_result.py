"""What a probe measures on one candidate batch: per-sample losses and the gradient Gram matrix.

Selection and sizing rules read only this (plain tensors), never the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ProbeResult"]


@dataclass(frozen=True)
class ProbeResult:
    """Per-sample statistics of one candidate batch of ``B`` samples.

    Attributes:
        losses: ``[B]`` per-sample losses, on the model's device.
        gram: ``[B, B]`` Gram matrix of per-sample head gradients, ``gram[i, j] = g_i . g_j``.
            Every quantity selection needs from the gradients is a quadratic form in it: the
            squared norm of a subset's mean gradient is ``s^T K s / |S|^2``.
        features: ``[B, ...]`` the head's inputs, kept for rules that want them (may be ``None``).
        logits: ``[B, ...]`` the head's outputs (may be ``None``).

    Example:
        >>> import torch
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # three per-sample gradients
        >>> r = ProbeResult(losses=torch.zeros(3), gram=g @ g.T)
        >>> r.grad_sq_norms().tolist()
        [1.0, 1.0, 2.0]
        >>> r.subset_mean_grad_sq_norms(torch.tensor([[1.0, 1.0, 0.0]])).tolist()  # mean of g0, g1
        [0.5]
    """

    losses: Tensor
    gram: Tensor
    features: Tensor | None = None
    logits: Tensor | None = None

    def __post_init__(self) -> None:
        b = self.losses.shape[0] if self.losses.dim() == 1 else -1
        if b < 0 or self.gram.shape != (b, b):
            raise ValueError(
                f"ProbeResult needs losses of shape [B] and gram of shape [B, B]; got "
                f"{tuple(self.losses.shape)} and {tuple(self.gram.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.losses.shape[0]

    @property
    def device(self) -> torch.device:
        return self.losses.device

    def grad_sq_norms(self) -> Tensor:
        """``[B]`` squared norms of the per-sample gradients, ``||g_i||^2``."""
        return self.gram.diagonal()

    def subset_mean_grad_sq_norms(self, weights: Tensor) -> Tensor:
        """Squared norm of the weighted mean gradient of each row of ``weights``.

        Args:
            weights: ``[S, B]`` non-negative weights (a 0/1 mask selects a subset). Each row must
                have a positive sum.

        Returns:
            ``[S]`` tensor: ``||sum_i w_i g_i / sum_i w_i||^2`` per row, clamped at 0 against
            round-off.
        """
        w = weights.to(device=self.gram.device, dtype=self.gram.dtype)
        quad = ((w @ self.gram) * w).sum(dim=1)
        return (quad / w.sum(dim=1).square()).clamp_min(0.0)

    def mean_grad_sq_norm(self) -> Tensor:
        """Scalar tensor: ``||mean_i g_i||^2`` over the whole batch."""
        return (self.gram.sum() / self.batch_size**2).clamp_min(0.0)

    def grad_variance(self) -> Tensor:
        """Scalar tensor: trace of the within-batch covariance of per-sample gradients.

        ``mean_i ||g_i||^2 - ||mean_i g_i||^2`` (the population variance, as CABS defines xi).
        """
        return (self.grad_sq_norms().mean() - self.mean_grad_sq_norm()).clamp_min(0.0)
