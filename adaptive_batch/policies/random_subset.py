"""RandomSubset (RS2): a fresh uniformly random part of the data each epoch, without replacement
across epochs (Okanovic et al., "Repeated Random Sampling for Minimizing the Time-to-Accuracy of
Learning", ICLR 2024)."""

from __future__ import annotations

import torch

from ..contract import EpochPlan, ScoreTable, Stateless
from ..errors import AdaptiveBatchError

__all__ = ["RandomSubset"]


class RandomSubset(Stateless):
    """Each epoch draws ``round(fraction * n)`` of the ``n`` indices of the index set, uniformly
    at random and without replacement across epochs: the epochs walk through one random
    permutation of the index set, then the next, so every sample is drawn once before any is
    drawn twice (an epoch that runs past the end of one permutation takes the rest of it and
    continues in the next, skipping what it already took).

    RS2 reads no scores, so it needs no feedback and no stage: give it to the sampler and train
    as usual. It is a strong method in its own right (in the RS2 paper it beats most published
    data-pruning methods in time to accuracy) and the control every score-based plan must beat at
    the same number of samples.

    Args:
        fraction: the share of the index set each epoch draws, in ``(0, 1]``.
        num_epochs: the run's length; epochs from ``num_epochs`` on draw everything (``None``:
            every epoch draws ``fraction``).
        seed: seeds the permutations (the same on every rank; a resumed run draws the same).

    Example:
        >>> import torch
        >>> from adaptive_batch.contract import ScoreTable
        >>> scores = ScoreTable.empty(10)
        >>> rs2 = RandomSubset(0.5, seed=0)
        >>> drawn = [rs2.plan(e, scores, torch.Generator()).drawn for e in range(2)]
        >>> [int(d.sum()) for d in drawn], bool((drawn[0] | drawn[1]).all())  # 2 epochs: all 10
        ([5, 5], True)
    """

    reads_scores = False  # the sampler expects no feedback for it

    def __init__(self, fraction: float, *, num_epochs: int | None = None, seed: int = 0) -> None:
        if not 0.0 < fraction <= 1.0:
            raise AdaptiveBatchError(f"fraction must lie in (0, 1]; got {fraction}")
        if num_epochs is not None and num_epochs < 1:
            raise AdaptiveBatchError(f"num_epochs must be positive; got {num_epochs}")
        self.fraction = fraction
        self.num_epochs = num_epochs
        self.seed = seed
        # (size, count, epoch, round, offset): where the walk stood last (a cache, not state)
        self._walk: tuple[int, int, int, int, int] | None = None

    def per_epoch(self, size: int) -> int:
        """How many of ``size`` indices an epoch draws (at least one)."""
        return max(1, round(self.fraction * size))

    def _permutation(self, round_: int, size: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + round_) % 2**62)
        return torch.randperm(size, generator=generator)

    def _take(
        self, round_: int, offset: int, size: int, count: int
    ) -> tuple[torch.Tensor, int, int]:
        """The next ``count`` positions of the walk from ``offset`` in permutation ``round_``: the
        indices, and where the walk stands after them. An epoch that runs past the end of a
        permutation takes the rest of it and continues in the next, skipping what it already
        took, so it draws exactly ``count`` distinct indices."""
        permutation = self._permutation(round_, size)
        if offset + count <= size:
            taken = permutation[offset : offset + count]
            after = (round_ + 1, 0) if offset + count == size else (round_, offset + count)
            return taken, *after
        tail = permutation[offset:]
        following = self._permutation(round_ + 1, size)
        in_tail = torch.zeros(size, dtype=torch.bool)
        in_tail[tail] = True
        fresh = (~in_tail[following]).nonzero().flatten()[: count - tail.numel()]
        taken = torch.cat([tail, following[fresh]])
        return taken, round_ + 1, int(fresh[-1]) + 1 if fresh.numel() else 0

    def _walk_to(self, epoch: int, size: int, count: int) -> tuple[int, int]:
        """Where the walk stands at the start of ``epoch`` (cached: the walk is a function of the
        seed, the size and the count, so it is not state)."""
        walk = self._walk
        if walk is None or walk[:2] != (size, count) or walk[2] > epoch:
            walk = (size, count, 0, 0, 0)
        _, _, at, round_, offset = walk
        while at < epoch:
            if offset + count < size:  # within one permutation: no need to draw it
                offset += count
            else:
                _, round_, offset = self._take(round_, offset, size, count)
            at += 1
        self._walk = (size, count, at, round_, offset)
        return round_, offset

    def plan(self, epoch: int, scores: ScoreTable, generator: torch.Generator) -> EpochPlan:
        size = scores.losses.numel()
        if self.num_epochs is not None and epoch >= self.num_epochs:
            return EpochPlan.everything(size, drawn_fraction=1.0)
        count = self.per_epoch(size)
        round_, offset = self._walk_to(epoch, size, count)
        taken, *_ = self._take(round_, offset, size, count)
        drawn = torch.zeros(size, dtype=torch.bool)
        drawn[taken] = True
        return EpochPlan(drawn, None, {"drawn_fraction": count / size})
