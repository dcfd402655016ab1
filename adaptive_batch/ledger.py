"""FeedbackLedger: which handed-out indices still await feedback, and what became of each index."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

import torch
from torch import Tensor

__all__ = ["FeedbackLedger"]


class FeedbackLedger:
    """Tracks the batches (or chunks) a sampler handed out until feedback names them.

    Feedback must name exactly the indices of one or more entries still in flight; anything else
    (indices never handed out, feedback given twice, a batch older than ``max_in_flight``
    entries) is refused, so a wrong dataset wrapper or a mismatched sampler cannot go unnoticed.

    Attributes:
        times_kept, times_dropped: per dataset index, how often feedback reported it kept or dropped.
        num_feedback: feedback calls received.
        num_samples: candidates fed back so far (over all ranks under DDP).
        lags: ``Counter`` of how many batches' feedback was still missing when each batch size
            was decided (0 = sized from all earlier feedback).
    """

    def __init__(self, num_samples: int, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1; got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self.in_flight: deque[Tensor] = deque()
        self.times_kept = torch.zeros(num_samples, dtype=torch.int32)
        self.times_dropped = torch.zeros(num_samples, dtype=torch.int32)
        self.num_feedback = 0
        self.num_samples = 0
        self.lags: Counter[int] = Counter()

    def handed_out(self, indices: Tensor) -> None:
        if len(self.in_flight) == self.max_in_flight:
            self.in_flight.popleft()  # its feedback, if it ever comes, will be refused
        self.in_flight.append(indices)

    def settle(self, candidates: Tensor) -> None:
        """Remove the in-flight entries whose indices together are exactly ``candidates``."""
        if self._settle_oldest(candidates):
            return
        wanted = set(candidates.tolist())
        if len(wanted) != candidates.numel():
            raise ValueError("feedback names some dataset index twice (kept and dropped overlap?)")
        matched, total = [], 0
        for position, entry in enumerate(self.in_flight):
            values = entry.tolist()
            if values and all(v in wanted for v in values):
                matched.append(position)
                total += len(values)
                if total == len(wanted):
                    break
        if total != len(wanted):
            raise ValueError(
                f"feedback names {len(wanted)} dataset indices that are not batches this sampler "
                f"handed out and still awaits feedback for (first few: {candidates[:8].tolist()}). "
                "Is the dataset wrapped in IndexedDataset, and is feedback given once per batch?"
            )
        for position in reversed(matched):
            del self.in_flight[position]

    def _settle_oldest(self, candidates: Tensor) -> bool:
        """The common case, in tensor ops: feedback for the oldest entries, in order."""
        count, total = 0, 0
        for entry in self.in_flight:
            count += 1
            total += entry.numel()
            if total >= candidates.numel():
                break
        if total != candidates.numel() or count == 0:
            return False
        oldest = torch.cat([self.in_flight[i] for i in range(count)]).sort().values
        if not torch.equal(oldest, candidates.sort().values):
            return False
        for _ in range(count):
            self.in_flight.popleft()
        return True

    def record(self, kept: Tensor, dropped: Tensor) -> None:
        self.times_kept[kept] += 1
        self.times_dropped[dropped] += 1
        self.num_samples += kept.numel() + dropped.numel()

    def state_dict(self) -> dict[str, Any]:
        return {
            "times_kept": self.times_kept.clone(),
            "times_dropped": self.times_dropped.clone(),
            "num_feedback": self.num_feedback,
            "num_samples": self.num_samples,
            "lags": dict(self.lags),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.times_kept = state["times_kept"].clone()
        self.times_dropped = state["times_dropped"].clone()
        self.num_feedback = state["num_feedback"]
        self.num_samples = state["num_samples"]
        self.lags = Counter(state["lags"])
        self.in_flight.clear()
