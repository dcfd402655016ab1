"""FeedbackLedger: per dataset index, what is awaiting feedback and what feedback said.

Every per-step method costs ``O(batch)``: the columns are numpy views of torch tensors (numpy's
indexing of a few hundred entries costs about a microsecond, a torch op several), and the totals
are counters, never sums over the table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..contract import ScoreTable, require_keys
from ..errors import AdaptiveBatchError

__all__ = ["FeedbackLedger", "as_index_array"]

_SATURATED = np.iinfo(np.uint8).max


def as_index_array(indices: Any) -> np.ndarray:
    """Dataset indices as a flat ``int64`` numpy array (a view of a CPU tensor when it can)."""
    if isinstance(indices, Tensor):
        if indices.device.type != "cpu":
            indices = indices.cpu()  # feedback names indices on the host; a stage sends them so
        if indices.dtype != torch.int64 or indices.dim() != 1:
            indices = indices.reshape(-1).to(torch.int64)
        return indices.numpy()
    return np.asarray(indices, dtype=np.int64).reshape(-1)


class FeedbackLedger:
    """A table with one row per dataset index, and the totals of the feedback received.

    Columns (CPU tensors, 13 bytes per index; ``score_table_bytes()`` says so):

    * ``in_flight`` (``uint8``): hand-outs of the index still awaiting feedback. Feedback must
      name indices that await it, so a dataset that is not wrapped in ``IndexedDataset``,
      feedback given twice or indices from another sampler are refused. Each iterator over the
      sampler hands out its own pass; an index handed out by two passes awaits two feedbacks
      (the count saturates at 255 hand-outs without feedback: a sampler nobody reports to).
    * ``losses`` (``float32``): the latest per-sample loss reported for the index (``nan``
      before any): the scores epoch plans decide from.
    * ``times_kept``, ``times_dropped`` (``int32``): what feedback said about the index (over
      all ranks).

    Attributes:
        num_feedback: feedback calls received (on this rank).
        num_candidates, num_kept, num_scored: candidates fed back, kept, and given a loss (over
            all ranks).
    """

    KEPT_KEY = "times_kept"
    DROPPED_KEY = "times_dropped"
    LOSSES_KEY = "losses"
    FEEDBACK_KEY = "num_feedback"
    CANDIDATES_KEY = "num_candidates"
    NUM_KEPT_KEY = "num_kept"
    NUM_SCORED_KEY = "num_scored"

    def __init__(self, dataset_size: int) -> None:
        self.dataset_size = dataset_size
        self.in_flight = torch.zeros(dataset_size, dtype=torch.uint8)
        self.times_kept = torch.zeros(dataset_size, dtype=torch.int32)
        self.times_dropped = torch.zeros(dataset_size, dtype=torch.int32)
        self.losses = torch.full((dataset_size,), float("nan"))
        self._views()
        self.num_feedback = 0
        self.num_candidates = 0
        self.num_kept = 0
        self.num_scored = 0

    def _views(self) -> None:
        self._in_flight = self.in_flight.numpy()
        self._kept = self.times_kept.numpy()
        self._dropped = self.times_dropped.numpy()
        self._losses = self.losses.numpy()

    def score_table_bytes(self) -> int:
        """Bytes the per-index columns take."""
        columns = (self.in_flight, self.times_kept, self.times_dropped, self.losses)
        return sum(c.numel() * c.element_size() for c in columns)

    # -- per step: O(batch) ----------------------------------------------------------------------

    def handed_out(self, indices: np.ndarray) -> None:
        counts = self._in_flight[indices]
        self._in_flight[indices] = counts + (counts < _SATURATED)

    def settle(self, indices: np.ndarray) -> None:
        """Mark ``indices`` (one batch's candidates, on this rank) as fed back; count the call."""
        self._check_range(indices)
        if indices.size > 1:
            ordered = np.sort(indices)
            if bool((ordered[1:] == ordered[:-1]).any()):
                raise AdaptiveBatchError(
                    "feedback names some dataset index twice (do kept and dropped overlap?)"
                )
        counts = self._in_flight[indices]
        if not bool(counts.all()):
            self._refuse(indices[counts == 0])
        self._in_flight[indices] = counts - 1
        self.num_feedback += 1

    def settle_group(self, indices: np.ndarray, batches: int) -> bool:
        """Mark the candidates of ``batches`` consecutive batches as fed back (an index may be
        in several, once per hand-out it awaits); returns whether any index repeats."""
        self._check_range(indices)
        unique, occurrences = np.unique(indices, return_counts=True)
        counts = self._in_flight[unique]
        short = counts < occurrences
        if bool(short.any()):
            self._refuse(unique[short])
        self._in_flight[unique] = counts - occurrences.astype(counts.dtype)
        self.num_feedback += batches
        return unique.size != indices.size

    def _refuse(self, stray: np.ndarray) -> None:
        seen = (self._kept[stray] + self._dropped[stray]) > 0
        why = (
            "feedback was already given for them (feedback must come once per batch)"
            if bool(seen.all())
            else "this sampler never handed them out: is the dataset wrapped in "
            "IndexedDataset(dataset), and does the loader use this sampler as its batch_sampler?"
        )
        raise AdaptiveBatchError(
            f"feedback names {stray.size} dataset indices that await no feedback (first "
            f"few: {stray[:8].tolist()}): {why}"
        )

    def awaiting(self, indices: np.ndarray) -> bool:
        """Whether every one of ``indices`` awaits feedback."""
        self._check_range(indices)
        return bool(self._in_flight[indices].all())

    def record(self, kept: np.ndarray, dropped: np.ndarray, losses: np.ndarray | None) -> None:
        """Count one batch's feedback (from any rank); ``losses`` follow kept, then dropped."""
        self._kept[kept] += 1
        if dropped.size:
            self._dropped[dropped] += 1
        count = kept.size + dropped.size
        self.num_candidates += count
        self.num_kept += kept.size
        if losses is not None:
            if dropped.size:
                self._losses[kept] = losses[: kept.size]
                self._losses[dropped] = losses[kept.size :]
            else:
                self._losses[kept] = losses
            self.num_scored += count

    def record_group(
        self,
        candidates: np.ndarray,
        kept: np.ndarray | None,
        losses: np.ndarray | None,
        repeats: bool,
    ) -> None:
        """Count a group of batches' feedback (see :meth:`settle_group`): each occurrence of an
        index counts, and its latest loss is the one kept."""
        if kept is None:
            kept_indices, dropped = candidates, candidates[:0]
        else:
            kept_indices, dropped = candidates[kept], candidates[~kept]
        if repeats:
            np.add.at(self._kept, kept_indices, 1)
            np.add.at(self._dropped, dropped, 1)
            if losses is not None:  # the latest occurrence's loss, as batch by batch
                unique, first_from_end = np.unique(candidates[::-1], return_index=True)
                self._losses[unique] = losses[candidates.size - 1 - first_from_end]
        else:
            self._kept[kept_indices] += 1
            self._dropped[dropped] += 1
            if losses is not None:
                self._losses[candidates] = losses
        self.num_candidates += candidates.size
        self.num_kept += kept_indices.size
        if losses is not None:
            self.num_scored += candidates.size

    # -- per epoch ---------------------------------------------------------------------------------

    def scores(self, indices: Tensor | None) -> ScoreTable:
        """The columns epoch plans read, for ``indices`` (the index set, ``None``: every index),
        in their order: copies, so a plan may keep them."""
        if indices is None:
            return ScoreTable(
                self.losses.clone(), self.times_kept.clone(), self.times_dropped.clone()
            )
        return ScoreTable(
            self.losses[indices], self.times_kept[indices], self.times_dropped[indices]
        )

    def clear_in_flight(self) -> None:
        self.in_flight.zero_()

    def _check_range(self, indices: np.ndarray) -> None:
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= self.dataset_size):
            raise AdaptiveBatchError(
                f"feedback names values outside the dataset's indices [0, {self.dataset_size}) "
                f"(from {int(indices.min())} to {int(indices.max())}): feedback takes dataset "
                "indices, not positions in the batch"
            )

    # -- checkpointing -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            self.KEPT_KEY: self.times_kept.clone(),
            self.DROPPED_KEY: self.times_dropped.clone(),
            self.LOSSES_KEY: self.losses.clone(),
            self.FEEDBACK_KEY: self.num_feedback,
            self.CANDIDATES_KEY: self.num_candidates,
            self.NUM_KEPT_KEY: self.num_kept,
            self.NUM_SCORED_KEY: self.num_scored,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        require_keys(self, state, (self.KEPT_KEY, self.DROPPED_KEY, self.FEEDBACK_KEY))
        shapes = {k: tuple(state[k].shape) for k in (self.KEPT_KEY, self.DROPPED_KEY)}
        if any(shape != (self.dataset_size,) for shape in shapes.values()):
            raise AdaptiveBatchError(
                f"this ledger state is for another dataset size ({shapes}); this one has "
                f"{self.dataset_size} indices"
            )
        self.times_kept = state[self.KEPT_KEY].to(torch.int32).clone()
        self.times_dropped = state[self.DROPPED_KEY].to(torch.int32).clone()
        if self.LOSSES_KEY in state:  # version 2 checkpoints kept no scores
            self.losses = state[self.LOSSES_KEY].to(torch.float32).clone()
        else:
            self.losses = torch.full((self.dataset_size,), float("nan"))
        self.in_flight = torch.zeros(self.dataset_size, dtype=torch.uint8)
        self._views()
        self.num_feedback = state[self.FEEDBACK_KEY]
        # Version 2 checkpoints called the candidates fed back "num_samples".
        self.num_candidates = state.get(self.CANDIDATES_KEY, state.get("num_samples", 0))
        # Checkpoints before 0.3 kept no totals: count them once, here.
        self.num_kept = state.get(self.NUM_KEPT_KEY, int(self.times_kept.sum()))
        self.num_scored = state.get(self.NUM_SCORED_KEY, int((~self.losses.isnan()).sum()))
