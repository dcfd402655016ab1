"""InfoBatch: unbiased dynamic data pruning (Qin et al., ICLR 2024), as an epoch plan."""

from __future__ import annotations

from typing import Any

import torch

from ..contract import EpochPlan, ScoreTable, check_state_keys
from ..errors import AdaptiveBatchError
from .run_length import RunLength

__all__ = ["InfoBatch"]


class InfoBatch(RunLength):
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
        num_epochs: the run's length in epochs (``None``: prune every epoch, never anneal, and
            say so once; an epoch past it is said once too).
        rescale: weigh the kept well-learned samples by ``1 / (1 - r)`` (the paper's unbiased
            estimator); ``False`` keeps every weight 1 (the ablation).
        score: ``"last"`` (the paper's: each sample's latest loss) or ``"average"``: an
            exponential average of its losses over the epochs it was scored (factor
            ``score_decay``), so one lucky or unlucky epoch moves it less (kept in the rule's
            state: 8 bytes per index).
        score_decay: the average's factor (0.5: the latest loss weighs half).
        classes: class-balanced pruning: the class of each index of the sampler's index set, in
            its order (the whole dataset's labels without ``indices=``). Each class then has its
            own mean, and ``prune_ratio`` of each class's well-learned samples is dropped, so a
            class the model finds hard keeps its share instead of being measured against the
            easy classes' losses. ``None``: one mean over all (the paper's).

    Differences from the reference code: no monkey-patched DataLoader and no loop edit (the
    sampler plans, the stage reports losses); the plan is decided once per epoch, so ``len()`` is
    right for the epoch (the reference's is one epoch stale) and a checkpoint resumes it exactly.

    Example:
        >>> import torch
        >>> from adaptive_batch.contract import ScoreTable
        >>> losses = torch.tensor([0.1, 0.2, 0.3, 2.0, 3.0, float("nan")])
        >>> plan = InfoBatch(prune_ratio=0.5, num_epochs=10).plan(0, ScoreTable.of_losses(losses), torch.Generator().manual_seed(0))
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
        score: str = "last",
        score_decay: float = 0.5,
        classes: Any = None,
    ) -> None:
        if not 0.0 <= prune_ratio < 1.0:
            raise AdaptiveBatchError(f"prune_ratio must lie in [0, 1); got {prune_ratio}")
        if not 0.0 <= delta <= 1.0:
            raise AdaptiveBatchError(f"delta must lie in [0, 1]; got {delta}")
        if score not in ("last", "average"):
            raise AdaptiveBatchError(f"score must be 'last' or 'average'; got {score!r}")
        if not 0.0 <= score_decay < 1.0:
            raise AdaptiveBatchError(f"score_decay must lie in [0, 1); got {score_decay}")
        self._set_num_epochs(num_epochs)
        self.score = score
        self.score_decay = score_decay
        self._average: torch.Tensor | None = None  # score="average": per index, nan: none yet
        self._seen: torch.Tensor | None = None  # feedback counts when the average was last taken
        self.prune_ratio = prune_ratio
        self.delta = delta
        self.rescale = rescale
        self.classes = None if classes is None else torch.as_tensor(classes).long().flatten()
        if self.classes is not None and bool((self.classes < 0).any()):
            raise AdaptiveBatchError("classes must be non-negative class indices")

    anneals = property(lambda self: self.delta < 1, doc="Whether the last epochs train on all.")

    def prunes(self, epoch: int) -> bool:
        """Whether ``epoch`` prunes (the last ``1 - delta`` of the epochs do not)."""
        return self.num_epochs is None or epoch < self.delta * self.num_epochs

    def plan(self, epoch: int, scores: ScoreTable, generator: torch.Generator) -> EpochPlan:
        size = scores.losses.numel()
        losses = self._scores(scores)
        scored = ~losses.isnan() & losses.isfinite()
        if not self.prunes(epoch) or not bool(scored.any()) or self.prune_ratio == 0:
            return EpochPlan.everything(size, pruned=0.0)
        mean = float(losses[scored].mean())
        if self.classes is None:
            well_learned = (scored & (losses < mean)).nonzero().flatten()
            count = int(self.prune_ratio * well_learned.numel())
            order = torch.randperm(well_learned.numel(), generator=generator)
            pruned = well_learned[order[:count]]
        else:
            well_learned, pruned = self._by_class(losses, scored, generator)
            count = pruned.numel()
        drawn = torch.ones(size, dtype=torch.bool)
        drawn[pruned] = False
        weights = None
        if self.rescale:  # every well-learned sample, should it be drawn (the pruned are not)
            weights = torch.ones(size)
            weights[well_learned] = 1.0 / (1.0 - self.prune_ratio)
        stats = {"pruned": float(count), "well_learned": float(well_learned.numel()), "mean": mean}
        return EpochPlan(drawn, weights, stats)

    def _by_class(
        self, losses: torch.Tensor, scored: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The well-learned (below their class's mean) and the pruned of each class."""
        classes = self.classes
        assert classes is not None
        if classes.numel() != losses.numel():
            raise AdaptiveBatchError(
                f"classes has {classes.numel()} labels but the sampler's index set has "
                f"{losses.numel()} indices: give the class of each index of the index set, in "
                "its order"
            )
        well, pruned = [], []
        for label in classes[scored].unique().tolist():
            members = scored & (classes == label)
            mean = losses[members].mean()
            below = (members & (losses < mean)).nonzero().flatten()
            order = torch.randperm(below.numel(), generator=generator)
            well.append(below)
            pruned.append(below[order[: int(self.prune_ratio * below.numel())]])
        return torch.cat(well), torch.cat(pruned)

    def _scores(self, scores: ScoreTable) -> torch.Tensor:
        """Each index's score: its latest loss, or the average of those of the epochs since."""
        if self.score == "last":
            return scores.losses
        seen = scores.times_kept + scores.times_dropped
        if self._average is None or self._average.numel() != seen.numel():
            self._average = torch.full((seen.numel(),), float("nan"))
            self._seen = torch.zeros_like(seen)
        assert self._seen is not None
        fresh = (seen != self._seen) & scores.losses.isfinite()  # scored since the last plan
        first = fresh & self._average.isnan()
        again = fresh & ~first
        self._average[first] = scores.losses[first]
        decay = self.score_decay
        self._average[again] = decay * self._average[again] + (1 - decay) * scores.losses[again]
        self._seen = seen.clone()
        return self._average

    def state_dict(self) -> dict[str, Any]:
        if self.score == "last":
            return {}
        return {"average": self._average, "seen": self._seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state)
        if self.score == "average":
            self._average, self._seen = state["average"], state["seen"]
