"""WeightedLoss: a per-sample loss weighted by the epoch plan of the batch a stage yielded, and
restricted to the samples an in-batch rule keeps."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..contract import plan_rule_of
from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError, AdaptiveBatchWarning
from ..probe import LossFn, to_device

__all__ = ["PlanWeights", "WeightedLoss", "YieldedRows"]


class WeightedLoss:
    """A per-sample loss weighted by the current epoch plan and averaged, for the batch a stage
    just yielded: InfoBatch's rescaling without a change to the loop body. With an in-batch rule
    (Co-teaching's small-loss), the samples it leaves out weigh 0 and the loss is the mean over
    the kept. Without ``loss_fn``, the stage's own per-sample loss (``StepFeedback(loss=...)``),
    whose values are then also the batch's feedback: the losses are computed once per step.

    Called on the whole batch, or on consecutive parts of it (micro-batches), in order.
    """

    def __init__(self, loss_fn: LossFn | None, stage: PlanWeights) -> None:
        self.loss_fn = loss_fn
        self.stage = stage

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if self.loss_fn is None:
            losses = self.stage.own_losses(outputs, targets)
        else:
            losses = self.loss_fn(outputs, targets)
        if losses.dim() != 1:
            raise AdaptiveBatchError(
                "WeightedLoss needs per-sample losses: give a loss with reduction='none' "
                f"(got shape {tuple(losses.shape)})"
            )
        rows = losses.shape[0]
        weights = self.stage.next_weights(rows, losses.device)
        selected = self.stage.select_in_batch(losses)
        if selected is not None:
            mask, kept = selected
            scale = mask.to(losses.dtype) * (rows / kept)
            weights = scale if weights is None else weights * scale
        if weights is None:
            return losses.mean()
        # one fused op where (losses * weights).mean() takes two, forward and backward
        if weights.dtype != losses.dtype:
            weights = weights.to(losses.dtype)
        return losses.dot(weights) / rows


@dataclass
class YieldedRows:
    """The dataset indices of the rows a stage yielded last, and their plan weights once read."""

    indices: Tensor
    rows: int
    weights: Tensor | None = None
    weight_offset: int = 0
    weighed: bool = False  # whether the step's loss went through WeightedLoss


class PlanWeights:
    """Mixin of the stages (:class:`~adaptive_batch.StepFeedback`,
    :class:`~adaptive_batch.SubsetFilter`): the epoch plan's weights of the batch just yielded,
    and an in-batch rule's choice, for :class:`WeightedLoss`. A stage says which rows it yielded
    last with ``_yielded_rows()`` (a :class:`YieldedRows`; StepFeedback's ``PendingBatch`` is one,
    with the in-batch rule's ``kept_parts``)."""

    sampler: Any
    in_batch: Any = None
    _warned: set[str]

    def _yielded_rows(self) -> YieldedRows | None: ...

    def batch_weights(self) -> Tensor | None:
        """The epoch plan's training weights of the batch just yielded (``None``: all 1)."""
        pending = self._yielded_rows()
        if pending is None or self.sampler is None:
            return None
        if pending.weights is None:
            pending.weights = self.sampler.weights_of(pending.indices)
        return pending.weights

    def weighted(self, loss_fn: LossFn | None = None) -> WeightedLoss:
        """``loss_fn`` (per-sample: ``reduction="none"``) weighted by the epoch plan, averaged:
        create it once and call it as your loss; the loop body does not change. Without
        ``loss_fn`` (StepFeedback): the stage's own loss, computed once for both the training
        step and the feedback."""
        return WeightedLoss(loss_fn, self)

    def own_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The stage's own per-sample loss of ``outputs`` (what ``weighted()`` without a loss
        trains on)."""
        raise AdaptiveBatchTypeError(
            f"{type(self).__name__}.weighted() needs the per-sample loss to weigh: "
            "weighted(<loss with reduction='none'>)"
        )

    def next_weights(self, rows: int, device: torch.device) -> Tensor | None:
        """The weights of the next ``rows`` samples of the batch just yielded, on ``device``
        (consecutive calls walk through the batch: micro-batches); ``None``: all 1."""
        weights = self.batch_weights()
        pending = self._yielded_rows()
        if pending is not None:
            pending.weighed = True
            if rows > pending.rows:
                raise AdaptiveBatchError(
                    f"the weighted loss got {rows} rows, but the batch just yielded has "
                    f"{pending.rows}: call it on that batch's outputs (or consecutive parts)"
                )
        if weights is None or pending is None:
            return None
        start = pending.weight_offset if pending.weight_offset + rows <= pending.rows else 0
        pending.weight_offset = start + rows
        part = weights if rows == pending.rows else weights[start : start + rows]
        return to_device(part, device)

    def select_in_batch(self, losses: Tensor) -> tuple[Tensor, int] | None:
        """The in-batch rule's kept samples among these rows of the batch just yielded (a mask on
        their device, and how many), recorded for the feedback; ``None`` without a rule."""
        pending = self._yielded_rows()
        if self.in_batch is None or pending is None:
            return None
        mask, kept = self.in_batch.keep_mask(losses.detach(), getattr(self.sampler, "epoch", 0))
        pending.kept_parts.append(mask)
        pending.kept_rows += kept
        return mask, kept

    def _check_plan_weights_used(self, pending: YieldedRows) -> None:
        """Until the first batch whose epoch plan weighs it: say once if those weights never
        reached the loss (the loss did not go through ``batches.weighted``)."""
        if "plan_weights" in self._warned:
            return
        if pending.weighed or plan_rule_of(self.sampler.policy) is None:
            self._warned.add("plan_weights")  # the loss is weighted: nothing to check again
            return
        if self.sampler.weights_of(pending.indices) is None:  # O(batch), until the first
            return
        self._warned.add("plan_weights")
        warnings.warn(
            f"the epoch plan ({type(self.sampler.policy).__name__}) weighs the samples of "
            "this batch, but its loss did not go through batches.weighted(...), so the "
            "weights never reached it (InfoBatch's up-weights, small-loss's weight 0 for what it only "
            "re-scores). Compute the loss with "
            "loss_fn = batches.weighted(<per-sample loss, reduction='none'>).",
            AdaptiveBatchWarning,
            stacklevel=5,
        )
