"""BatchSizeLR: a learning-rate scheduler that follows the size the sampler actually draws."""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ..errors import AdaptiveBatchError

__all__ = ["BatchSizeLR"]

RULES = ("linear", "sqrt", "adascale", "damp")


class BatchSizeLR(LRScheduler):
    """Scales each parameter group's base learning rate by a factor of the current batch size.

    Call ``scheduler.step()`` after ``optimizer.step()``, as with any scheduler; the optimizer
    itself is untouched. With ``scale = B / B_0`` (``B`` the size the sampler draws now --
    ``sampler.batch_size``, never more than an epoch holds -- and ``B_0`` its size when the
    scheduler was built, or ``base_batch_size``):

    * ``"linear"``: ``scale`` (the linear scaling rule);
    * ``"sqrt"``: ``sqrt(scale)``;
    * ``"adascale"``: AdaScale's gain ``(var + sqr) / (var / scale + sqr)`` from the sampler's
      gradient-noise estimates (``sampler.gradient_noise``, kept by a
      :class:`~adaptive_batch.policies.GradientNoiseScale` sizing rule, as AdaptDL does);
      ``scale`` while no estimate exists or the gradient is all noise;
    * ``"damp"``: ``min(1, B / requested)``: when a sizing rule asks for more than the sampler
      can draw, the learning rate drops instead (AdaDamp / PadaDamp / GeoDamp:
      ``lr = lr_0 * B_max / B``).

    With DataLoader workers the sampler's current size belongs to a batch a few steps ahead (see
    docs/concepts.md); with ``num_workers=0`` or a ``chunk_size`` it is the next batch's.

    Example:
        >>> import torch
        >>> from adaptive_batch import AdaptiveBatchSampler, Feedback
        >>> from adaptive_batch.policies import PadaDamp
        >>> model = torch.nn.Linear(2, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sampler = AdaptiveBatchSampler(1000, policy=PadaDamp(rate=100.0, wait=0, dwell=1), batch_size=100)
        >>> scheduler = BatchSizeLR(optimizer, sampler, "linear")
        >>> batch = torch.tensor(next(iter(sampler)))
        >>> sampler.feedback(Feedback(batch, batch[:0]))  # PadaDamp asks for 100 + 100 * 1
        >>> optimizer.step()
        >>> scheduler.step()
        >>> sampler.batch_size, optimizer.param_groups[0]["lr"]
        (200, 0.2)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        sampler: Any,
        rule: str = "linear",
        *,
        base_batch_size: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        if rule not in RULES:
            raise AdaptiveBatchError(f"rule must be one of {RULES}; got {rule!r}")
        if rule == "adascale" and not sampler.estimates_gradient_noise:
            raise AdaptiveBatchError(
                "rule='adascale' needs a sampler whose sizing rule estimates the gradient noise "
                "(a GradientNoiseScale)"
            )
        self.sampler = sampler
        self.rule = rule
        self.base_batch_size = base_batch_size or sampler.batch_size
        super().__init__(optimizer, last_epoch)

    def factor(self) -> float:
        size = self.sampler.batch_size
        scale = size / self.base_batch_size
        if self.rule == "linear":
            return scale
        if self.rule == "sqrt":
            return math.sqrt(scale)
        if self.rule == "damp":
            requested = self.sampler.requested_batch_size
            return min(1.0, size / requested) if math.isfinite(requested) and requested > 0 else 1.0
        noise = self.sampler.gradient_noise
        if noise is None or noise.sq_norm <= 0:
            return scale
        var, sqr = max(noise.variance, 0.0), noise.sq_norm
        return (var + sqr) / (var / scale + sqr)

    def get_lr(self) -> list[float]:
        factor = self.factor()
        return [base * factor for base in self.base_lrs]
