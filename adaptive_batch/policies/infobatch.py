"""InfoBatch: unbiased dynamic data pruning (Qin et al., ICLR 2024), as an epoch plan."""

from __future__ import annotations

from typing import Any

import torch

from ..contract import EpochPlan, ScoreTable, Stateless
from ..errors import AdaptiveBatchError

__all__ = ["InfoBatch"]


class InfoBatch(Stateless):
    """Each epoch, drop at random a fraction ``prune_ratio`` of the well-learned samples -- those
    whose latest loss is below the mean -- and weigh the kept well-learned ones up by
    ``1 / (1 - prune_ratio)``, so the expected gradient is the full data's; the last
    ``1 - delta`` of the epochs train on everything.

    An epoch-plan rule: give it to the sampler (``policy=InfoBatch(...)``) and report per-sample
    losses -- from the training step itself (:class:`~adaptive_batch.StepFeedback`, no extra
    forward, as InfoBatch does) or a look-ahead probe. Samples without a loss yet are never
    pruned (InfoBatch starts every score above any mean). The weights reach the loss through
    ``StepFeedback.weighted(loss_fn)`` (or ``sampler.weights_of(indices)``).

    Args:
        prune_ratio: ``r``, the fraction of the well-learned samples dropped each epoch (0.5, the
            paper's default).
        delta: the fraction of ``num_epochs`` that prunes; later epochs use the full data
            (0.875, the paper's default).
        num_epochs: the run's length in epochs (``None``: prune every epoch, never anneal).
        rescale: weigh the kept well-learned samples by ``1 / (1 - r)`` (the paper's unbiased
            estimator); ``False`` keeps every weight 1 (the ablation).

    Differences from the reference code: no monkey-patched DataLoader and no loop edit (the
    sampler plans, the stage reports losses); the plan is decided once per epoch, so ``len()`` is
    right for the epoch (the reference's is one epoch stale) and a checkpoint resumes it exactly.

    Example:
        >>> import torch
        >>> from adaptive_batch.contract import ScoreTable
        >>> losses = torch.tensor([0.1, 0.2, 0.3, 2.0, 3.0, float("nan")])
        >>> plan = InfoBatch(prune_ratio=0.5).plan(0, ScoreTable.of_losses(losses), torch.Generator().manual_seed(0))
        >>> int(plan.drawn.sum()), sorted(set(plan.weights[plan.drawn].tolist()))  # 1 of 3 pruned
        (5, [1.0, 2.0])
    """

    def __init__(
        self,
        *,
        prune_ratio: float = 0.5,
        delta: float = 0.875,
        num_epochs: int | None = None,
        rescale: bool = True,
    ) -> None:
        if not 0.0 <= prune_ratio < 1.0:
            raise AdaptiveBatchError(f"prune_ratio must lie in [0, 1); got {prune_ratio}")
        if not 0.0 <= delta <= 1.0:
            raise AdaptiveBatchError(f"delta must lie in [0, 1]; got {delta}")
        if num_epochs is not None and num_epochs < 1:
            raise AdaptiveBatchError(f"num_epochs must be positive; got {num_epochs}")
        self.prune_ratio = prune_ratio
        self.delta = delta
        self.num_epochs = num_epochs
        self.rescale = rescale

    def prunes(self, epoch: int) -> bool:
        """Whether ``epoch`` prunes (the last ``1 - delta`` of the epochs do not)."""
        return self.num_epochs is None or epoch < self.delta * self.num_epochs

    def plan(self, epoch: int, scores: ScoreTable, generator: torch.Generator) -> EpochPlan:
        size = scores.losses.numel()
        scored = scores.scored & scores.losses.isfinite()
        if not self.prunes(epoch) or not bool(scored.any()) or self.prune_ratio == 0:
            return EpochPlan.everything(size, pruned=0.0)
        mean = float(scores.losses[scored].mean())
        well_learned = (scored & (scores.losses < mean)).nonzero().flatten()
        count = int(self.prune_ratio * well_learned.numel())
        pruned = well_learned[torch.randperm(well_learned.numel(), generator=generator)[:count]]
        drawn = torch.ones(size, dtype=torch.bool)
        drawn[pruned] = False
        weights = None
        if self.rescale:  # every well-learned sample, should it be drawn (the pruned are not)
            weights = torch.ones(size)
            weights[well_learned] = 1.0 / (1.0 - self.prune_ratio)
        stats = {"pruned": float(count), "well_learned": float(well_learned.numel()), "mean": mean}
        return EpochPlan(drawn, weights, stats)

    def state_dict(self) -> dict[str, Any]:
        return {}
