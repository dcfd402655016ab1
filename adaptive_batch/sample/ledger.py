"""FeedbackLedger: per dataset index, what is awaiting feedback and what feedback said."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..contract import ScoreTable, require_keys
from ..errors import AdaptiveBatchError

__all__ = ["FeedbackLedger"]


class FeedbackLedger:
    """A table with one row per dataset index, and the totals of the feedback received.

    Columns (CPU tensors, a few bytes per index):

    * ``in_flight``: hand-outs of the index still awaiting feedback. Feedback must name indices
      that await it, so a dataset that is not wrapped in ``IndexedDataset``, feedback given twice
      or indices from another sampler are refused, whatever the number of batches in flight (no
      bound to reach: a loader may prefetch as far as it likes, a batch may hold any number of
      chunks). Each iterator over the sampler hands out its own pass; an index handed out by two
      passes awaits two feedbacks.
    * ``pass_total`` (chunk mode): how many indices the pass that last handed the index out hands
      out from where it started, so the consumer of a chunk knows where its pass ends.
    * ``times_kept``, ``times_dropped``: what feedback said about the index (over all ranks).
    * ``losses``, ``times_scored``: the latest per-sample loss feedback reported for the index
      (``nan`` before any) and how many were reported: the scores epoch plans decide from.

    Attributes:
        num_feedback: feedback calls received (on this rank).
        num_candidates: candidates fed back (over all ranks).
    """

    KEPT_KEY = "times_kept"
    DROPPED_KEY = "times_dropped"
    LOSSES_KEY = "losses"
    SCORED_KEY = "times_scored"
    FEEDBACK_KEY = "num_feedback"
    CANDIDATES_KEY = "num_candidates"

    def __init__(self, dataset_size: int) -> None:
        self.dataset_size = dataset_size
        self.in_flight = torch.zeros(dataset_size, dtype=torch.int32)
        self.pass_totals: Tensor | None = None
        self.times_kept = torch.zeros(dataset_size, dtype=torch.int32)
        self.times_dropped = torch.zeros(dataset_size, dtype=torch.int32)
        self.losses = torch.full((dataset_size,), float("nan"))
        self.times_scored = torch.zeros(dataset_size, dtype=torch.int32)
        self.num_feedback = 0
        self.num_candidates = 0

    def handed_out(self, indices: Tensor, pass_total: int | None = None) -> None:
        self.in_flight[indices] += 1
        if pass_total is not None:
            if self.pass_totals is None:
                self.pass_totals = torch.zeros(self.dataset_size, dtype=torch.int64)
            self.pass_totals[indices] = pass_total

    def pass_total(self, indices: Tensor) -> int:
        """The ``pass_total`` of a chunk's indices (refused for indices never handed out in
        chunks, or whose recorded passes disagree)."""
        indices = self._check_range(indices)
        if self.pass_totals is None or bool((self.in_flight[indices] <= 0).any()):
            raise AdaptiveBatchError(
                "a chunk names dataset indices this sampler did not hand out as chunks: batches "
                "assembled from chunks need IndexedDataset(dataset) and the sampler's own loader"
            )
        totals = self.pass_totals[indices]
        if bool((totals != totals[0]).any()):
            raise AdaptiveBatchError("a chunk holds indices handed out by different passes")
        return int(totals[0])

    def settle(self, indices: Tensor) -> None:
        """Mark ``indices`` (one batch's candidates, on this rank) as fed back."""
        indices = self._check_range(indices)
        if indices.unique().numel() != indices.numel():
            raise AdaptiveBatchError(
                "feedback names some dataset index twice (do kept and dropped overlap?)"
            )
        waiting = self.in_flight[indices] > 0
        if not bool(waiting.all()):
            stray = indices[~waiting]
            seen = (self.times_kept[stray] + self.times_dropped[stray]) > 0
            why = (
                "feedback was already given for them (feedback must come once per batch)"
                if bool(seen.all())
                else "this sampler never handed them out: is the dataset wrapped in "
                "IndexedDataset(dataset), and does the loader use this sampler as its batch_sampler?"
            )
            raise AdaptiveBatchError(
                f"feedback names {stray.numel()} dataset indices that await no feedback (first "
                f"few: {stray[:8].tolist()}): {why}"
            )
        self.in_flight[indices] -= 1

    def record(self, kept: Tensor, dropped: Tensor, losses: Tensor | None = None) -> None:
        """Count one batch's feedback (from any rank); ``losses`` follow kept, then dropped."""
        self.times_kept[kept] += 1
        self.times_dropped[dropped] += 1
        self.num_candidates += kept.numel() + dropped.numel()
        if losses is not None:
            candidates = torch.cat([kept, dropped])
            self.losses[candidates] = losses.to(torch.float32)
            self.times_scored[candidates] += 1

    def scores(self, indices: Tensor) -> ScoreTable:
        """The columns epoch plans read, for ``indices`` (the index set), in their order."""
        return ScoreTable(
            losses=self.losses[indices],
            times_scored=self.times_scored[indices],
            times_kept=self.times_kept[indices],
            times_dropped=self.times_dropped[indices],
        )

    def clear_in_flight(self) -> None:
        self.in_flight.zero_()

    def _check_range(self, indices: Tensor) -> Tensor:
        indices = indices.to("cpu", torch.long).flatten()
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.dataset_size):
            raise AdaptiveBatchError(
                f"feedback names values outside the dataset's indices [0, {self.dataset_size}) "
                f"(from {int(indices.min())} to {int(indices.max())}): feedback takes dataset "
                "indices, not positions in the batch"
            )
        return indices

    def state_dict(self) -> dict[str, Any]:
        return {
            self.KEPT_KEY: self.times_kept.clone(),
            self.DROPPED_KEY: self.times_dropped.clone(),
            self.LOSSES_KEY: self.losses.clone(),
            self.SCORED_KEY: self.times_scored.clone(),
            self.FEEDBACK_KEY: self.num_feedback,
            self.CANDIDATES_KEY: self.num_candidates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        require_keys(self, state, (self.KEPT_KEY, self.DROPPED_KEY, self.FEEDBACK_KEY))
        self.times_kept = state[self.KEPT_KEY].clone()
        self.times_dropped = state[self.DROPPED_KEY].clone()
        if self.LOSSES_KEY in state:  # version 2 checkpoints kept no scores
            self.losses = state[self.LOSSES_KEY].clone()
            self.times_scored = state[self.SCORED_KEY].clone()
        self.num_feedback = state[self.FEEDBACK_KEY]
        # Version 2 checkpoints called the candidates fed back "num_samples".
        self.num_candidates = state.get(self.CANDIDATES_KEY, state.get("num_samples", 0))
        self.clear_in_flight()
