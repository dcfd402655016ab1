"""SelectiveBackprop: keep high-loss samples (Jiang et al.; Composer's maintained version)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..contract import ProbeResult, Reason, Selection, require_keys
from ..errors import AdaptiveBatchError, renamed_arguments

__all__ = ["SelectiveBackprop"]


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
        percentiles = (torch.arange(size, dtype=torch.float64) + 0.5) / size
        weights = percentiles ** (1.0 / self.keep - 1.0)
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
        require_keys(self, state, ("generator",))
        self._generator.set_state(state["generator"])
        self.candidates_seen = state.get("candidates_seen", state.get("samples_seen", 0))


def _mean_or_nan(losses: torch.Tensor, kept: torch.Tensor) -> float:
    mask = torch.ones(losses.numel(), dtype=torch.bool)
    mask[kept] = False
    return float(losses[mask].mean()) if bool(mask.any()) else math.nan
