"""WeightedLoss: a per-sample loss weighted by the epoch plan of the batch a stage yielded."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import AdaptiveBatchError
from ..probe import LossFn, to_device

__all__ = ["PlanWeights", "WeightedLoss"]


class WeightedLoss:
    """A per-sample loss weighted by the current epoch plan and averaged, for the batch a stage
    just yielded: InfoBatch's rescaling without a change to the loop body.

    Called on the whole batch, or on consecutive parts of it (micro-batches), in order.
    """

    def __init__(self, loss_fn: LossFn, stage: PlanWeights) -> None:
        self.loss_fn = loss_fn
        self.stage = stage

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        losses = self.loss_fn(outputs, targets)
        if losses.dim() != 1:
            raise AdaptiveBatchError(
                "WeightedLoss needs per-sample losses: give a loss with reduction='none' "
                f"(got shape {tuple(losses.shape)})"
            )
        weights = self.stage.next_weights(losses.shape[0], losses.device)
        return (losses if weights is None else losses * weights).mean()


class PlanWeights:
    """Mixin of :class:`~adaptive_batch.StepFeedback`: the epoch plan's weights of the batch it
    yielded, for :class:`WeightedLoss`."""

    sampler: Any
    _pending: Any

    def batch_weights(self) -> Tensor | None:
        """The epoch plan's training weights of the batch just yielded (``None``: all 1)."""
        pending = self._pending
        if pending is None:
            return None
        if pending.weights is None:
            pending.weights = self.sampler.weights_of(pending.indices)
        return pending.weights

    def weighted(self, loss_fn: LossFn) -> WeightedLoss:
        """``loss_fn`` (per-sample: ``reduction="none"``) weighted by the epoch plan, averaged:
        create it once and call it as your loss; the loop body does not change."""
        return WeightedLoss(loss_fn, self)

    def next_weights(self, rows: int, device: torch.device) -> Tensor | None:
        """The weights of the next ``rows`` samples of the batch just yielded, on ``device``
        (consecutive calls walk through the batch: micro-batches); ``None``: all 1."""
        weights = self.batch_weights()
        pending = self._pending
        if weights is None or pending is None:
            return None
        start = pending.weight_offset if pending.weight_offset + rows <= pending.rows else 0
        pending.weight_offset = start + rows
        return to_device(weights[start : start + rows], device)
