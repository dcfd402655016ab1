"""Selective-Backprop: keep high-loss samples (Jiang et al. 2019; Composer's maintained version),
with a fresh look-ahead loss (:class:`SelectiveBackprop`) or the stale loss of the last time each
sample was trained (:class:`StaleSelectiveBackprop`, an epoch plan: no extra forward)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..contract import (
    EpochPlan,
    ProbeResult,
    Reason,
    ScoreTable,
    Selection,
    Stateless,
    check_state_keys,
)
from ..errors import AdaptiveBatchError, renamed_arguments
from .run_length import RunLength

__all__ = ["SelectiveBackprop", "StaleSelectiveBackprop", "percentile_weights"]


def percentile_weights(size: int, keep: float) -> torch.Tensor:
    """``q ** (1 / keep - 1)`` for the loss percentiles ``q = (rank + 0.5) / size``, ranks
    ascending: the selection probability of each rank. Their mean is about ``keep``
    (``integral of q ** beta = 1 / (beta + 1)``).

    Example:
        >>> percentile_weights(4, 0.5).tolist()  # keep 0.5: beta = 1, the percentile itself
        [0.125, 0.375, 0.625, 0.875]
    """
    percentiles = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    return percentiles ** (1.0 / keep - 1.0)


class SelectiveBackprop:
    """Keeps ``round(keep * B)`` samples, drawn without replacement with probability rising with
    the loss percentile: ``p_i ~ q_i ** (1 / keep - 1)`` for ``q_i = (rank_i + 0.5) / B``.

    The loss-based selection users compare against: no gradients needed (the probe's losses
    suffice).

    Args:
        keep: fraction of each batch kept (0.5, Composer's default).
        start, end: active from ``start`` to ``end`` of training, as fractions of
            ``total_candidates`` (0.5 and 0.9, Composer's defaults); outside, every sample is
            kept.
        total_candidates: candidates over the whole run (for example ``epochs * len(index
            set)``; formerly ``total_samples``); ``None`` keeps the rule always active.
        seed: seed of the CPU generator that draws the samples.
    """

    @renamed_arguments(total_samples="total_candidates")
    def __init__(
        self,
        keep: float = 0.5,
        *,
        start: float = 0.5,
        end: float = 0.9,
        total_candidates: int | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 < keep <= 1.0:
            raise AdaptiveBatchError(f"keep must lie in (0, 1]; got {keep}")
        if not 0.0 <= start <= end <= 1.0:
            raise AdaptiveBatchError(f"need 0 <= start <= end <= 1; got {start}, {end}")
        if total_candidates is not None and total_candidates < 1:
            raise AdaptiveBatchError(f"total_candidates must be positive; got {total_candidates}")
        self.keep = keep
        self.start = start
        self.end = end
        self.total_candidates = total_candidates
        self.candidates_seen = 0
        self._generator = torch.Generator().manual_seed(seed)

    def active(self) -> bool:
        if self.total_candidates is None:
            return True
        return self.start <= self.candidates_seen / self.total_candidates < self.end

    def select(self, result: ProbeResult) -> Selection:
        size = result.batch_size
        active = self.active()
        self.candidates_seen += size
        if not active:
            return Selection.keep_all(size, Reason.KEEP_ALL)
        if size == 1:
            return Selection.keep_all(size, Reason.SINGLE_SAMPLE)
        losses = result.losses.double().cpu()  # the one host transfer per batch
        if not bool(losses.isfinite().all()):
            return Selection.keep_all(size, Reason.NONFINITE)
        order = losses.argsort(stable=True)  # ascending loss: rank 0 is the lowest
        weights = percentile_weights(size, self.keep)
        count = max(1, round(self.keep * size))
        ranks = torch.multinomial(weights, count, replacement=False, generator=self._generator)
        kept = order[ranks]
        stats = {
            "kept_loss": float(losses[kept].mean()),
            "dropped_loss": _mean_or_nan(losses, kept),
        }
        return Selection(kept, size, Reason.SELECTED, stats)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state(), "candidates_seen": self.candidates_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state)
        self._generator.set_state(state["generator"])
        self.candidates_seen = state.get("candidates_seen", state.get("samples_seen", 0))


def _mean_or_nan(losses: torch.Tensor, kept: torch.Tensor) -> float:
    mask = torch.ones(losses.numel(), dtype=torch.bool)
    mask[kept] = False
    return float(losses[mask].mean()) if bool(mask.any()) else math.nan


class StaleSelectiveBackprop(RunLength, Stateless):
    """Stale Selective-Backprop as an epoch plan: each epoch draws each sample with probability
    ``q ** (1 / keep - 1)``, ``q`` the percentile of its latest loss (from the last time it was
    trained: no extra forward), so about ``keep`` of the data, the high-loss samples most often.

    Jiang et al.'s Stale-SB reuses the previous epoch's losses instead of a new forward (a
    further ~26% faster in their measurements). Samples without a loss are always drawn, as are
    all samples before ``start_epoch`` (1: the first epoch scores every sample) and from ``end``
    of ``num_epochs`` on (0.9, Composer's end of the active window).

    Args:
        keep: the fraction of the data each epoch draws (0.5, Composer's default).
        start_epoch: the first epoch that selects.
        end: the fraction of ``num_epochs`` after which every epoch draws everything.
        num_epochs: the run's length (``None``: select until the end, and say so once; an
            epoch past it is said once too).

    Example:
        >>> import torch
        >>> from adaptive_batch.contract import ScoreTable
        >>> losses = torch.arange(1000.0)
        >>> plan = StaleSelectiveBackprop(keep=0.5, num_epochs=10).plan(1, ScoreTable.of_losses(losses), torch.Generator().manual_seed(0))
        >>> round(plan.drawn.float().mean().item(), 1), bool(plan.drawn[900:].float().mean() > 0.8)
        (0.5, True)
    """

    def __init__(
        self,
        keep: float = 0.5,
        *,
        start_epoch: int = 1,
        end: float = 0.9,
        num_epochs: int | None = None,
    ) -> None:
        if not 0.0 < keep <= 1.0:
            raise AdaptiveBatchError(f"keep must lie in (0, 1]; got {keep}")
        if start_epoch < 0 or not 0.0 <= end <= 1.0:
            raise AdaptiveBatchError(
                f"need start_epoch >= 0 and 0 <= end <= 1; got {start_epoch}, {end}"
            )
        self.keep = keep
        self.start_epoch = start_epoch
        self.end = end
        self._set_num_epochs(num_epochs)

    anneals = property(lambda self: self.end < 1, doc="Whether the last epochs train on all.")

    def selects(self, epoch: int) -> bool:
        past_end = self.num_epochs is not None and epoch >= self.end * self.num_epochs
        return self.start_epoch <= epoch and not past_end

    def plan(self, epoch: int, scores: ScoreTable, generator: torch.Generator) -> EpochPlan:
        size = scores.losses.numel()
        scored = (scores.scored & scores.losses.isfinite()).nonzero().flatten()
        if not self.selects(epoch) or scored.numel() < 2:
            return EpochPlan.everything(size, drawn_fraction=1.0)
        order = scores.losses[scored].argsort(stable=True)
        probability = torch.empty(scored.numel(), dtype=torch.float64)
        probability[order] = percentile_weights(scored.numel(), self.keep)
        chosen = torch.rand(scored.numel(), generator=generator, dtype=torch.float64) < probability
        if not bool(chosen.any()):
            chosen[order[-1]] = True
        drawn = torch.ones(size, dtype=torch.bool)
        drawn[scored] = chosen
        return EpochPlan(drawn, None, {"drawn_fraction": float(drawn.float().mean())})
