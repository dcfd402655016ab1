"""WeightedLoss: a per-sample loss weighted by the epoch plan of the batch a stage yielded."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..errors import AdaptiveBatchError
from ..probe import LossFn

if TYPE_CHECKING:
    from .step_feedback import StepFeedback

__all__ = ["WeightedLoss"]


class WeightedLoss:
    """A per-sample loss weighted by the current epoch plan and averaged, for the batch a stage
    just yielded: InfoBatch's rescaling without a change to the loop body.

    Called on the whole batch, or on consecutive parts of it (micro-batches), in order.
    """

    def __init__(self, loss_fn: LossFn, stage: StepFeedback) -> None:
        self.loss_fn = loss_fn
        self.stage = stage

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        losses = self.loss_fn(outputs, targets)
        if losses.dim() != 1:
            raise AdaptiveBatchError(
                "WeightedLoss needs per-sample losses: give a loss with reduction='none' "
                f"(got shape {tuple(losses.shape)})"
            )
        weights = self.stage._next_weights(losses.shape[0], losses.device)
        return (losses if weights is None else losses * weights).mean()
