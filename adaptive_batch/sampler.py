"""AdaptiveBatchSampler: a DataLoader ``batch_sampler`` whose batch size follows feedback."""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from .feedback import Feedback, Progress
from .policies.base import SizingRule, sizing_rule_of

__all__ = ["AdaptiveBatchSampler", "fold_tail"]

_STATE_VERSION = 1


def fold_tail(requested: int, remaining: int, min_size: int, max_size: int) -> int:
    """Size of the next batch when ``remaining`` indices are left in the epoch.

    Takes ``requested`` where it can, but never leaves a remainder smaller than ``min_size``: the
    remainder joins this batch if that stays within ``max_size``, else this batch gives up
    enough that the remainder reaches ``min_size``. Only when neither is possible (``max_size <
    2 * min_size - 1``, or fewer than ``min_size`` indices in all) is the last batch short.

    Example:
        >>> fold_tail(100, 105, 10, 1000)  # 5 would be left over: take them now
        105
        >>> fold_tail(1000, 1005, 10, 1000)  # 1005 > max: leave exactly 10 for the last batch
        995
    """
    size = min(requested, remaining)
    rest = remaining - size
    if 0 < rest < min_size:
        if remaining <= max_size:
            size = remaining
        elif remaining - min_size >= min_size:
            size = remaining - min_size
    return size


def _digest(indices: Tensor) -> str:
    return hashlib.sha1(indices.numpy().tobytes()).hexdigest()[:16]


class AdaptiveBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices whose size a sizing rule adapts from feedback.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)``; a
    :class:`~adaptive_batch.SubsetFilter` (or your own code) calls :meth:`feedback` after each
    batch and the policy's sizing rule picks the size of the batches drawn after that.

    Args:
        data_source: the dataset (anything with ``len``) or its length.
        policy: a :class:`~adaptive_batch.policies.Policy` or a sizing rule; ``None`` keeps
            ``batch_size`` fixed. Only the sizing half is used here.
        batch_size: size of the first batch (EDBA's start: 100).
        min_batch_size, max_batch_size: caps on every size the policy asks for (EDBA's: 10, 1000).
        indices: the index set to draw from (a subset of the dataset); default all of it. Nothing
            outside it is ever yielded.
        shuffle: draw each epoch in a seeded random order (``seed`` and the epoch); else in the
            order of ``indices``.
        seed: seed of the shuffle.
        drop_last: drop an epoch's last batch when it is smaller than ``min_batch_size`` (which
            only happens when the caps cannot split the epoch otherwise; see :func:`fold_tail`).
        max_in_flight: how many yielded batches may await feedback at once. Batches a loader
            prefetches wait here; feedback for a batch older than that is refused.

    Every epoch yields each index of the index set exactly once (at most once with
    ``drop_last``). Every batch is within the caps except, where the caps leave no choice, the
    last of an epoch. Each ``iter()`` continues a loaded ``state_dict`` where it left off, starts
    the next epoch after a finished one, and otherwise starts the current epoch over (a pass
    abandoned midway is replayed). :meth:`set_epoch` chooses the epoch explicitly, as with
    ``DistributedSampler``; ``torchdata.nodes.SamplerWrapper`` calls it for you.

    Example:
        >>> sampler = AdaptiveBatchSampler(10, batch_size=4, min_batch_size=3, seed=0)
        >>> [len(b) for b in sampler]
        [4, 6]
        >>> sorted(i for b in sampler for i in b) == list(range(10))
        True
    """

    def __init__(
        self,
        data_source: Sized | int,
        *,
        policy: Any = None,
        batch_size: int = 100,
        min_batch_size: int = 10,
        max_batch_size: int = 1000,
        indices: Sequence[int] | Tensor | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        max_in_flight: int = 64,
    ) -> None:
        num_samples = data_source if isinstance(data_source, int) else len(data_source)
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (length {num_samples})")
        if not 1 <= min_batch_size <= max_batch_size:
            raise ValueError(
                f"need 1 <= min_batch_size <= max_batch_size; got {min_batch_size}, {max_batch_size}"
            )
        if not min_batch_size <= batch_size <= max_batch_size:
            raise ValueError(
                f"batch_size {batch_size} is outside [min_batch_size, max_batch_size] = "
                f"[{min_batch_size}, {max_batch_size}]"
            )
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1; got {max_in_flight}")
        self.num_samples = num_samples
        self.indices = self._check_indices(indices, num_samples)
        if drop_last and self.indices.numel() < min_batch_size:
            raise ValueError(
                f"with drop_last, an index set of {self.indices.numel()} (fewer than "
                f"min_batch_size={min_batch_size}) would never yield a batch"
            )
        self.policy = policy
        self.sizing: SizingRule | None = sizing_rule_of(policy)
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.max_in_flight = max_in_flight

        self._batch_size = batch_size
        self.requested_batch_size: float = float(batch_size)  # the sizing rule's unclamped answer
        self._epoch = 0
        self._position = 0  # indices yielded in the current epoch
        self._resume = False  # the next iter() continues from _position (after load_state_dict)
        self._in_flight: deque[Tensor] = deque()  # sorted indices of batches awaiting feedback
        self.times_kept = torch.zeros(num_samples, dtype=torch.int32)
        self.times_dropped = torch.zeros(num_samples, dtype=torch.int32)
        self.num_feedback = 0
        self.num_samples_fed_back = 0
        self.num_dropped_tails = 0
        self.last_feedback: Feedback | None = None

    @staticmethod
    def _check_indices(indices: Sequence[int] | Tensor | None, num_samples: int) -> Tensor:
        if indices is None:
            return torch.arange(num_samples)
        tensor = torch.as_tensor(indices)
        if tensor.numel() == 0:
            raise ValueError("indices is empty: the sampler would have nothing to yield")
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise TypeError(f"indices must be integers; got {tensor.dtype}")
        tensor = tensor.to(torch.long).flatten().cpu()
        if tensor.min() < 0 or tensor.max() >= num_samples:
            raise ValueError(
                f"indices must lie in [0, {num_samples}); got values from {int(tensor.min())} "
                f"to {int(tensor.max())}"
            )
        if tensor.unique().numel() != tensor.numel():
            raise ValueError("indices contains duplicates; each index may appear once")
        return tensor.clone()

    # -- properties -------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """The size the next batch is drawn at (before end-of-epoch folding)."""
        return self._batch_size

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def is_adaptive(self) -> bool:
        return self.sizing is not None and self.min_batch_size < self.max_batch_size

    # -- iteration --------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Draw the next pass in the order of ``epoch``. Setting the epoch that a loaded,
        unfinished state is in keeps its position; otherwise the pass starts at the beginning."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative; got {epoch}")
        if epoch != self._epoch or self._finished:
            self._epoch = epoch
            self._position = 0
            self._resume = False

    @property
    def _finished(self) -> bool:
        return self._position >= self.indices.numel()

    def _order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return self.indices
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return self.indices[torch.randperm(self.indices.numel(), generator=generator)]

    def __iter__(self) -> Iterator[list[int]]:
        # An epoch is finished once its position reaches the end (whether or not the consumer
        # ran this generator to completion); the next pass then starts the next epoch.
        if self._resume:
            self._resume = False
        elif self._finished:
            self._epoch, self._position = self._epoch + 1, 0
        else:
            self._position = 0  # an abandoned pass starts over
        epoch = self._epoch
        order = self._order(epoch)
        total = order.numel()
        while self._epoch == epoch and self._position < total:
            remaining = total - self._position
            size = fold_tail(self._batch_size, remaining, self.min_batch_size, self.max_batch_size)
            if size == remaining and size < self.min_batch_size and self.drop_last:
                self.num_dropped_tails += 1
                self._position = total
                return
            batch = order[self._position : self._position + size]
            self._position += size
            self._track(batch)
            yield batch.tolist()

    def _track(self, batch: Tensor) -> None:
        if len(self._in_flight) == self.max_in_flight:
            self._in_flight.popleft()  # its feedback, if it ever comes, will be refused
        self._in_flight.append(batch.sort().values)

    def __len__(self) -> int:
        """Batches per epoch; a ``TypeError`` when feedback decides it (torch's convention for
        an unknown length)."""
        if self.is_adaptive:
            raise TypeError(
                "the number of batches of an AdaptiveBatchSampler with a sizing policy depends on "
                "the feedback it will receive, so it has no len()"
            )
        remaining, count = self.indices.numel(), 0
        while remaining > 0:
            size = fold_tail(self._batch_size, remaining, self.min_batch_size, self.max_batch_size)
            if not (size == remaining and size < self.min_batch_size and self.drop_last):
                count += 1
            remaining -= size
        return count

    # -- feedback ---------------------------------------------------------------------------

    def feedback(self, feedback: Feedback) -> None:
        """Record what became of one yielded batch, then let the sizing rule pick the next size.

        Raises ``ValueError`` when the kept and dropped indices are not exactly one batch this
        sampler yielded and has not had feedback for (wrong dataset indices, a batch from another
        sampler, feedback given twice, or a batch more than ``max_in_flight`` batches old).
        """
        kept = feedback.kept.to(torch.long).flatten().cpu()
        dropped = feedback.dropped.to(torch.long).flatten().cpu()
        candidates = torch.cat([kept, dropped]).sort().values
        for position, batch in enumerate(self._in_flight):
            if batch.numel() == candidates.numel() and torch.equal(batch, candidates):
                del self._in_flight[position]
                break
        else:
            raise ValueError(
                f"feedback names {candidates.numel()} dataset indices that are not one batch this "
                f"sampler yielded and still awaits feedback for (first few: "
                f"{candidates[:8].tolist()}). Is the dataset wrapped in IndexedDataset, and is "
                "feedback given once per batch?"
            )
        self.times_kept[kept] += 1
        self.times_dropped[dropped] += 1
        self.num_feedback += 1
        self.num_samples_fed_back += candidates.numel()
        self.last_feedback = feedback
        if self.sizing is not None:
            progress = Progress(self.num_feedback, self.num_samples_fed_back, self.indices.numel())
            requested = float(self.sizing.next_batch_size(self._batch_size, feedback, progress))
            if not math.isnan(requested):  # a rule's NaN never changes the size
                self.requested_batch_size = requested
                self._batch_size = self._clamp(requested)

    def _clamp(self, size: float) -> int:
        if size == math.inf:
            return self.max_batch_size
        if size == -math.inf:
            return self.min_batch_size
        return int(min(max(round(size), self.min_batch_size), self.max_batch_size))

    # -- checkpointing ----------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "num_indices": self.indices.numel(),
            "indices_digest": _digest(self.indices),
            "min_batch_size": self.min_batch_size,
            "max_batch_size": self.max_batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "sizing": type(self.sizing).__name__ if self.sizing is not None else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the same batches: epoch, position, size, the
        sizing rule's state and the per-index counters. Batches awaiting feedback are not kept:
        a restored loader draws from the saved position on."""
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "epoch": self._epoch,
            "position": self._position,
            "batch_size": self._batch_size,
            "requested_batch_size": self.requested_batch_size,
            "sizing": self.sizing.state_dict() if self.sizing is not None else None,
            "times_kept": self.times_kept.clone(),
            "times_dropped": self.times_dropped.clone(),
            "num_feedback": self.num_feedback,
            "num_samples_fed_back": self.num_samples_fed_back,
            "num_dropped_tails": self.num_dropped_tails,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the next ``iter()`` resumes at the saved position."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"unsupported AdaptiveBatchSampler state version {state.get('version')!r}"
            )
        ours, theirs = self._config(), state["config"]
        differing = sorted(k for k in ours if ours[k] != theirs.get(k))
        if differing:
            details = ", ".join(
                f"{k}: saved {theirs.get(k)!r}, here {ours[k]!r}" for k in differing
            )
            raise ValueError(
                f"the state_dict comes from a differently configured sampler ({details})"
            )
        if self.sizing is not None:
            self.sizing.load_state_dict(state["sizing"])
        self._epoch = state["epoch"]
        self._position = state["position"]
        self._batch_size = state["batch_size"]
        self.requested_batch_size = state["requested_batch_size"]
        self.times_kept = state["times_kept"].clone()
        self.times_dropped = state["times_dropped"].clone()
        self.num_feedback = state["num_feedback"]
        self.num_samples_fed_back = state["num_samples_fed_back"]
        self.num_dropped_tails = state["num_dropped_tails"]
        self._in_flight.clear()
        self._resume = True
