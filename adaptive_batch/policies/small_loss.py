"""Small-loss selection: train on the samples the model fits, drop those it cannot -- under label
noise, mostly the mislabelled ones (Co-teaching, Han et al. 2018; DivideMix, Li et al. 2020)."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

from ..contract import (
    EpochPlan,
    Policy,
    ProbeResult,
    Reason,
    ScoreTable,
    Selection,
    Stateless,
    check_state_keys,
)
from ..errors import AdaptiveBatchError
from .in_batch import InBatchSmallLoss
from .mixture import fit_loss_mixture

__all__ = ["SmallLoss", "SmallLossPlan", "SmallLossSelection"]


def _check(fraction: float | None, max_fraction: float) -> None:
    if fraction is not None and not 0.0 <= fraction < 1.0:
        raise AdaptiveBatchError(f"fraction must lie in [0, 1); got {fraction}")
    if not 0.0 <= max_fraction < 1.0:
        raise AdaptiveBatchError(f"max_fraction must lie in [0, 1); got {max_fraction}")


#: The mixture is fitted to at most this many losses (a seeded random sample of them beyond):
#: two Gaussians need no more, and a plan over 10M samples stays a second's work.
MIXTURE_SAMPLE = 100_000


def high_loss_drops(
    losses: Tensor, reference: Tensor, fraction: float | None, max_fraction: float
) -> tuple[Tensor, dict[str, float]]:
    """``bool`` mask of the ``losses`` to drop: the highest ``fraction`` of them, or (``fraction``
    ``None``) those a two-component mixture fitted to ``reference`` (a seeded sample of
    :data:`MIXTURE_SAMPLE` of it, when larger) calls noisy, at most ``max_fraction`` of them,
    the highest first."""
    count = losses.numel()
    if fraction is None:
        if reference.numel() > MIXTURE_SAMPLE:
            generator = torch.Generator().manual_seed(reference.numel())
            sample = torch.randint(0, reference.numel(), (MIXTURE_SAMPLE,), generator=generator)
            reference = reference[sample]
        mixture = fit_loss_mixture(reference)
        if mixture is None:
            return torch.zeros(count, dtype=torch.bool), {"estimated_fraction": 0.0}
        noisy = mixture.clean_probability(losses) < 0.5
        stats = {
            "estimated_fraction": float(noisy.float().mean()),
            "noisy_mean": mixture.noisy_mean,
        }
        limit = int(max_fraction * count)
        if int(noisy.sum()) <= limit:
            return noisy, stats
        fraction = max_fraction
    else:
        stats = {}
    drops = torch.zeros(count, dtype=torch.bool)
    drops[losses.argsort(descending=True, stable=True)[: int(fraction * count)]] = True
    return drops, stats


class SmallLossPlan(Stateless):
    """Epoch plan: after ``warmup_epochs``, draw only the samples whose latest loss is small.

    Args:
        fraction: drop this fraction of the scored samples, the highest losses first; ``None``
            (default) estimates it each epoch from the loss distribution: a two-component
            mixture (DivideMix's) calls a sample noisy when the high-loss component explains it
            best; no second mode, nothing dropped.
        warmup_epochs: epochs trained on everything first (the losses must separate: networks fit
            clean samples before mislabelled ones). Default 5.
        max_fraction: never drop more than this fraction of the scored samples (0.6).
        rescore: the share of the dropped samples drawn again each epoch at weight 0 (0.2): their
            forward refreshes their loss, so one the network has since learned to fit (a clean
            hard sample) comes back, and the training set never freezes on stale losses. With
            ``batches.weighted(...)`` they are only scored; a plain loss trains on them too.

    Samples without a loss yet are always drawn. Under label noise this keeps most mislabelled
    samples out of training; on clean data it drops the hardest samples, which costs accuracy.
    """

    def __init__(
        self,
        *,
        fraction: float | None = None,
        warmup_epochs: int = 5,
        max_fraction: float = 0.6,
        rescore: float = 0.2,
    ) -> None:
        _check(fraction, max_fraction)
        if warmup_epochs < 0:
            raise AdaptiveBatchError(f"warmup_epochs must be non-negative; got {warmup_epochs}")
        if not 0.0 <= rescore <= 1.0:
            raise AdaptiveBatchError(f"rescore must lie in [0, 1]; got {rescore}")
        self.fraction = fraction
        self.warmup_epochs = warmup_epochs
        self.max_fraction = max_fraction
        self.rescore = rescore

    def plan(self, epoch: int, scores: ScoreTable, generator: torch.Generator) -> EpochPlan:
        size = scores.losses.numel()
        scored = (scores.scored & scores.losses.isfinite()).nonzero().flatten()
        if epoch < self.warmup_epochs or scored.numel() < 4:
            return EpochPlan.everything(size, dropped=0.0)
        losses = scores.losses[scored]
        drops, stats = high_loss_drops(losses, losses, self.fraction, self.max_fraction)
        dropped = scored[drops]
        drawn = torch.ones(size, dtype=torch.bool)
        drawn[dropped] = False
        weights = None
        count = round(self.rescore * dropped.numel())
        if count:  # a seeded random share of the dropped, scored again at weight 0
            again = dropped[torch.randperm(dropped.numel(), generator=generator)[:count]]
            drawn[again] = True
            weights = torch.ones(size)
            weights[again] = 0.0
        stats = {"dropped": float(dropped.numel() - count), "rescored": float(count), **stats}
        return EpochPlan(drawn, weights, stats)


class SmallLossSelection:
    """Look-ahead selection: in each candidate batch, keep the samples with small losses.

    Args:
        fraction: drop this fraction of each batch, the highest losses first; ``None`` (default)
            decides with a two-component mixture fitted to the last ``memory`` candidate losses.
        warmup_candidates: candidates seen whole before selecting (the losses must separate).
        max_fraction: never drop more than this fraction of a batch (0.6).
        memory: how many recent candidate losses the mixture is fitted to (4096).
    """

    def __init__(
        self,
        *,
        fraction: float | None = None,
        warmup_candidates: int = 0,
        max_fraction: float = 0.6,
        memory: int = 4096,
    ) -> None:
        _check(fraction, max_fraction)
        if warmup_candidates < 0 or memory < 4:
            raise AdaptiveBatchError("need warmup_candidates >= 0 and memory >= 4")
        self.fraction = fraction
        self.warmup_candidates = warmup_candidates
        self.max_fraction = max_fraction
        self.memory = memory
        self.candidates_seen = 0
        self.recent: deque[float] = deque(maxlen=memory)

    def select(self, result: ProbeResult) -> Selection:
        size = result.batch_size
        losses = result.losses.detach().double().cpu()  # the one host transfer per batch
        self.candidates_seen += size
        if not bool(losses.isfinite().all()):
            return Selection.keep_all(size, Reason.NONFINITE)
        self.recent.extend(losses.tolist())
        if self.candidates_seen <= self.warmup_candidates:
            return Selection.keep_all(size, Reason.WARMUP)
        if size == 1:
            return Selection.keep_all(size, Reason.SINGLE_SAMPLE)
        reference = torch.tensor(list(self.recent), dtype=torch.float64)
        drops, stats = high_loss_drops(losses, reference, self.fraction, self.max_fraction)
        if bool(drops.all()):
            drops[losses.argmin()] = False  # a selection keeps at least one sample
        return Selection((~drops).nonzero().flatten(), size, Reason.SELECTED, stats)

    def state_dict(self) -> dict[str, Any]:
        return {"candidates_seen": self.candidates_seen, "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state)
        self.candidates_seen = state["candidates_seen"]
        self.recent = deque(state["recent"], maxlen=self.memory)


class SmallLoss(Policy):
    """Small-loss selection as an epoch plan (``stage="plan"``, default: at no extra forward,
    from the losses the training step reports), inside each batch from the training forward's
    own losses (``stage="in_batch"``, Co-teaching's form: :class:`InBatchSmallLoss`, applied by
    ``StepFeedback.weighted``) or as a look-ahead selection rule in a
    :class:`~adaptive_batch.SubsetFilter` (``stage="look_ahead"``).

    Args:
        stage: ``"plan"``, ``"in_batch"`` or ``"look_ahead"``.
        fraction, max_fraction: as in :class:`SmallLossPlan` and :class:`SmallLossSelection`;
            in-batch, ``fraction`` is the forget rate (required there: the expected noise rate).
        warmup_epochs: epochs trained on everything first (5); in-batch, the epochs over which
            the forget rate ramps up from 0.
        rescore: the plan's share of the dropped drawn again at weight 0 (:class:`SmallLossPlan`).
        epoch_size: candidates per epoch; the look-ahead rule counts its warm-up in candidates,
            ``warmup_epochs * epoch_size`` (required there when ``warmup_epochs > 0``).

    Example:
        >>> policy = SmallLoss()
        >>> type(policy.plan).__name__, policy.selection
        ('SmallLossPlan', None)
    """

    def __init__(
        self,
        *,
        stage: str = "plan",
        fraction: float | None = None,
        warmup_epochs: int = 5,
        max_fraction: float = 0.6,
        epoch_size: int | None = None,
        rescore: float = 0.2,
    ) -> None:
        if stage == "plan":
            super().__init__(
                plan=SmallLossPlan(
                    fraction=fraction,
                    warmup_epochs=warmup_epochs,
                    max_fraction=max_fraction,
                    rescore=rescore,
                )
            )
        elif stage == "look_ahead":
            if warmup_epochs and epoch_size is None:
                raise AdaptiveBatchError(
                    "SmallLoss(stage='look_ahead') counts its warm-up in candidates: give "
                    "epoch_size= (or warmup_epochs=0)"
                )
            warmup = warmup_epochs * (epoch_size or 0)
            super().__init__(
                selection=SmallLossSelection(
                    fraction=fraction, warmup_candidates=warmup, max_fraction=max_fraction
                )
            )
        elif stage == "in_batch":
            if fraction is None:
                raise AdaptiveBatchError(
                    "SmallLoss(stage='in_batch') drops a fixed share of each batch: give "
                    "fraction= (the expected noise rate, Co-teaching's forget rate)"
                )
            super().__init__(in_batch=InBatchSmallLoss(fraction, ramp_epochs=warmup_epochs))
        else:
            raise AdaptiveBatchError(
                f"stage must be 'plan', 'in_batch' or 'look_ahead'; got {stage!r}"
            )
