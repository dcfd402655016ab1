"""In-batch small-loss selection (Co-teaching, Han et al. 2018): each step trains on the samples
of its batch with the smallest losses, read from the training forward itself.

Where the epoch plan (:class:`~adaptive_batch.policies.SmallLossPlan`) decides from losses up to
an epoch old, this rule decides from the current forward's, so a sample it leaves out is scored
again the next time it is drawn: nothing freezes. It costs no extra forward and no host sync: the
losses never leave the device, and how many to keep is a host number from the schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..contract import Stateless
from ..errors import AdaptiveBatchError

__all__ = ["InBatchSmallLoss"]


class InBatchSmallLoss(Stateless):
    """Keep the ``1 - min(epoch / ramp_epochs, 1) * forget_rate`` smallest losses of each batch
    (Co-teaching's schedule, ``T_k = ramp_epochs``).

    Applied by :class:`~adaptive_batch.StepFeedback` through its weighted loss
    (``loss_fn = batches.weighted(F.cross_entropy with reduction="none")``): the left-out samples
    get weight 0, the kept ones ``B / kept`` so the loss is the mean over the kept. The sampler
    counts them as kept and dropped.

    Args:
        forget_rate: ``tau``, the share of each batch left out once the ramp is done; Co-teaching
            sets it to the (estimated) noise rate.
        ramp_epochs: epochs over which the left-out share grows linearly from 0 (10, as in
            Co-teaching: networks fit clean samples first, so early losses do not yet separate).

    Example:
        >>> import torch
        >>> rule = InBatchSmallLoss(0.5, ramp_epochs=2)
        >>> rule.keep_fraction(0), rule.keep_fraction(1), rule.keep_fraction(5)
        (1.0, 0.75, 0.5)
        >>> mask, kept = rule.keep_mask(torch.tensor([0.1, 3.0, 0.2, 2.5]), epoch=5)
        >>> mask.tolist(), kept
        ([True, False, True, False], 2)
    """

    feedback_source = "training_step"  # it acts on the training forward's own losses

    def __init__(self, forget_rate: float, *, ramp_epochs: int = 10) -> None:
        if not 0.0 <= forget_rate < 1.0:
            raise AdaptiveBatchError(f"forget_rate must lie in [0, 1); got {forget_rate}")
        if ramp_epochs < 0:
            raise AdaptiveBatchError(f"ramp_epochs must be non-negative; got {ramp_epochs}")
        self.forget_rate = forget_rate
        self.ramp_epochs = ramp_epochs

    def keep_fraction(self, epoch: int) -> float:
        ramp = 1.0 if self.ramp_epochs == 0 else min(epoch / self.ramp_epochs, 1.0)
        return 1.0 - ramp * self.forget_rate

    def keep_mask(self, losses: Tensor, epoch: int) -> tuple[Tensor, int]:
        """The kept samples of one batch (a mask on the losses' device) and how many."""
        rows = losses.shape[0]
        kept = min(rows, max(1, math.ceil(self.keep_fraction(epoch) * rows - 1e-9)))
        mask = torch.ones(rows, dtype=torch.bool, device=losses.device)
        if kept < rows:
            # NaN sorts last, so a sample without a finite loss is never among the smallest.
            order = torch.nan_to_num(losses.detach(), nan=math.inf).topk(kept, largest=False)
            mask = torch.zeros_like(mask).index_fill_(0, order.indices, True)
        return mask, kept
