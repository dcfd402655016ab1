"""AdaptiveBatchSampler: a DataLoader ``batch_sampler`` whose batch size follows feedback."""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from . import distributed
from .buckets import SizeBuckets
from .feedback import Feedback, Progress
from .ledger import FeedbackLedger
from .policies.base import SizingRule, sizing_rule_of

__all__ = ["AdaptiveBatchSampler", "fold_tail"]

_STATE_VERSION = 2


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
        batch_size: size of the first batch (EDBA's start: 100), per rank.
        min_batch_size, max_batch_size: caps on every size the policy asks for (EDBA's: 10, 1000).
        indices: the index set to draw from (a subset of the dataset); default all of it. Nothing
            outside it is ever yielded.
        shuffle: draw each epoch in a seeded random order (``seed`` and the epoch); else in the
            order of ``indices``.
        seed: seed of the shuffle; must be the same on every rank.
        drop_last: drop an epoch's last batch when it is smaller than ``min_batch_size`` (which
            only happens when the caps cannot split the epoch otherwise; see :func:`fold_tail`).
        max_in_flight: how many yielded batches (or chunks) may await feedback at once.
        chunk_size: size batches *where they are consumed*: yield chunks of this many indices and
            let the SubsetFilter assemble candidate batches of the current size from them. Sizes
            then take effect at once however far a loader prefetches, and a checkpoint taken with
            DataLoader workers resumes exactly; sizes are multiples of ``chunk_size``. ``None``
            (default) yields whole batches, sized when the loader asks for them.
        buckets: round every size to these (a :class:`~adaptive_batch.SizeBuckets`, an int for
            its multiples, or a list of sizes), bounding the shapes ``torch.compile`` sees.
        num_replicas, rank: as for ``DistributedSampler``; default from the process group.

    Every epoch yields each index of the index set exactly once (at most once with
    ``drop_last``; under DDP each rank gets a disjoint ``1/num_replicas`` of it, and the
    ``len(indices) % num_replicas`` indices left over rotate with the shuffle). Every batch is
    within the caps except, where the caps leave no choice, the last of an epoch. Each ``iter()``
    continues a loaded ``state_dict`` where it left off, starts the next epoch after a finished
    one, and otherwise starts the current epoch over (a pass abandoned midway is replayed).
    :meth:`set_epoch` chooses the epoch explicitly, as with ``DistributedSampler``;
    ``torchdata.nodes.SamplerWrapper`` calls it for you.

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
        chunk_size: int | None = None,
        buckets: SizeBuckets | int | Sequence[int] | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        num_samples = data_source if isinstance(data_source, int) else len(data_source)
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (length {num_samples})")
        if not 1 <= min_batch_size <= max_batch_size:
            raise ValueError(
                f"need 1 <= min_batch_size <= max_batch_size; got {min_batch_size}, {max_batch_size}"
            )
        self.num_replicas, self.rank = distributed.resolve_replicas(num_replicas, rank)
        self._data_source = None if isinstance(data_source, int) else data_source
        self.num_samples = num_samples
        self.indices = self._check_indices(indices, num_samples)
        self.shard_size = self.indices.numel() // self.num_replicas
        if self.shard_size < 1:
            raise ValueError(
                f"{self.indices.numel()} indices cannot give each of {self.num_replicas} replicas one"
            )
        self.policy = policy
        self.sizing: SizingRule | None = sizing_rule_of(policy)
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.chunk_size = chunk_size
        self.buckets = self._check_buckets(
            buckets, chunk_size, drop_last, min_batch_size, max_batch_size
        )
        if not self._allowed(batch_size):
            raise ValueError(
                f"batch_size {batch_size} is outside the allowed sizes: [min_batch_size, "
                f"max_batch_size] = [{min_batch_size}, {max_batch_size}]"
                + (f" and in {self.buckets}" if self.buckets else "")
            )
        if drop_last and self.shard_size < min_batch_size:
            raise ValueError(
                f"with drop_last, an index set of {self.shard_size} per replica (fewer than "
                f"min_batch_size={min_batch_size}) would never yield a batch"
            )
        if self.num_replicas > 1 and self.is_adaptive and not torch.distributed.is_initialized():
            raise ValueError(
                "an adaptive sampler on several replicas needs torch.distributed initialised: the "
                "ranks agree on batch sizes by gathering their feedback"
            )

        self._batch_size = batch_size
        self.requested_batch_size: float = float(batch_size)  # the sizing rule's unclamped answer
        self._epoch = 0
        self._position = 0  # indices of this rank's shard handed out in the current pass
        self._resume = False  # the next iter() continues from _position (after load_state_dict)
        self._consumed = 0  # chunk mode: indices of the shard assembled into batches
        self._decisions = 0  # batch sizes decided so far
        self._agreed = False  # ranks checked to be configured alike
        self.ledger = FeedbackLedger(num_samples, max_in_flight)
        self.last_feedback: Feedback | None = None
        self.num_dropped_tails = 0
        self._warned_in_flight = False

    # -- construction checks ------------------------------------------------------------------

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

    @staticmethod
    def _check_buckets(
        buckets: Any, chunk_size: int | None, drop_last: bool, low: int, high: int
    ) -> SizeBuckets | None:
        if chunk_size is not None:
            if buckets is not None:
                raise ValueError(
                    "chunk_size already rounds sizes to its multiples; give buckets or chunk_size"
                )
            if drop_last:
                raise ValueError("drop_last is not supported with chunk_size")
            if not 1 <= chunk_size <= high:
                raise ValueError(
                    f"chunk_size must lie in [1, max_batch_size={high}]; got {chunk_size}"
                )
            buckets = SizeBuckets(multiple=chunk_size)
        elif isinstance(buckets, int):
            buckets = SizeBuckets(multiple=buckets)
        elif buckets is not None and not isinstance(buckets, SizeBuckets):
            buckets = SizeBuckets(sizes=buckets)
        if buckets is not None and not buckets.within(low, high):
            raise ValueError(f"no size of {buckets} lies within [{low}, {high}]")
        return buckets

    def _allowed(self, size: int) -> bool:
        in_caps = self.min_batch_size <= size <= self.max_batch_size
        return in_caps and (self.buckets is None or self.buckets.contains(size))

    # -- properties -----------------------------------------------------------------------------

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

    @property
    def times_kept(self) -> Tensor:
        return self.ledger.times_kept

    @property
    def times_dropped(self) -> Tensor:
        return self.ledger.times_dropped

    @property
    def num_feedback(self) -> int:
        return self.ledger.num_feedback

    @property
    def feedback_lag(self) -> dict[int, int]:
        """How many batches' feedback was missing when each batch size was decided, counted."""
        return dict(self.ledger.lags)

    # -- iteration ------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Draw the next pass in the order of ``epoch``. Setting the epoch that a loaded,
        unfinished state is in keeps its position; otherwise the pass starts at the beginning."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative; got {epoch}")
        if epoch != self._epoch or self._position >= self.shard_size:
            self._epoch = epoch
            self._position = 0
            self._resume = False

    def _shard(self, epoch: int) -> Tensor:
        order = self.indices
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = order[torch.randperm(order.numel(), generator=generator)]
        return order[: self.shard_size * self.num_replicas][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        # The pass starts now, not at the first next(): a consumer may plan a batch before that.
        self._check_dataset()
        if self._resume:
            self._resume = False
        elif self._position >= self.shard_size:  # the last pass finished
            self._epoch, self._position = self._epoch + 1, 0
        else:
            self._position = 0  # an abandoned pass starts over
        self._consumed = self._position  # nothing of this pass is in flight yet
        epoch, shard = self._epoch, self._shard(self._epoch)
        return self._chunks(epoch, shard) if self.chunk_size else self._batches(epoch, shard)

    def _batches(self, epoch: int, shard: Tensor) -> Iterator[list[int]]:
        while self._epoch == epoch and self._position < self.shard_size:
            remaining = self.shard_size - self._position
            size = self._decide(remaining)
            if size == remaining and size < self.min_batch_size and self.drop_last:
                self.num_dropped_tails += 1
                self._position = self.shard_size
                return
            yield self._hand_out(shard, size)

    def _chunks(self, epoch: int, shard: Tensor) -> Iterator[list[int]]:
        assert self.chunk_size is not None
        while self._epoch == epoch and self._position < self.shard_size:
            yield self._hand_out(shard, min(self.chunk_size, self.shard_size - self._position))

    def _hand_out(self, shard: Tensor, size: int) -> list[int]:
        batch = shard[self._position : self._position + size]
        self._position += size
        self.ledger.handed_out(batch)
        return batch.tolist()

    def _decide(self, remaining: int) -> int:
        """The next batch's size, with ``remaining`` indices left; records the feedback lag."""
        self.ledger.lags[self._decisions - self.ledger.num_feedback] += 1
        self._decisions += 1
        return fold_tail(self._batch_size, remaining, self.min_batch_size, self.max_batch_size)

    def plan_batch(self) -> int:
        """Chunk mode: how many indices the consumer should assemble into the next batch (0 when
        the pass is over). Sized from all feedback so far."""
        if self.chunk_size is None:
            raise TypeError("plan_batch() is for samplers with a chunk_size")
        remaining = self.shard_size - self._consumed
        if remaining <= 0:
            return 0
        g = self.chunk_size
        chunks = fold_tail(
            self._batch_size // g,
            -(-remaining // g),
            -(-self.min_batch_size // g),
            max(1, self.max_batch_size // g),
        )
        self.ledger.lags[self._decisions - self.ledger.num_feedback] += 1
        self._decisions += 1
        size = min(chunks * g, remaining)
        self._consumed += size
        return size

    def __len__(self) -> int:
        """Batches (chunks, with a ``chunk_size``) per epoch; a ``TypeError`` when feedback decides
        it (torch's convention for an unknown length)."""
        if self.chunk_size is not None:
            return -(-self.shard_size // self.chunk_size)
        if self.is_adaptive:
            raise TypeError(
                "the number of batches of an AdaptiveBatchSampler with a sizing policy depends on "
                "the feedback it will receive, so it has no len()"
            )
        remaining, count = self.shard_size, 0
        while remaining > 0:
            size = fold_tail(self._batch_size, remaining, self.min_batch_size, self.max_batch_size)
            if not (size == remaining and size < self.min_batch_size and self.drop_last):
                count += 1
            remaining -= size
        return count

    def _check_dataset(self) -> None:
        if self._data_source is not None and len(self._data_source) != self.num_samples:
            raise ValueError(
                f"the dataset's length changed from {self.num_samples} to {len(self._data_source)} "
                "since the sampler was built; build a new sampler for it"
            )
        if self.num_replicas > 1 and not self._agreed and torch.distributed.is_initialized():
            distributed.check_same_config(self._config(), self.rank)
            self._agreed = True

    # -- feedback -------------------------------------------------------------------------------

    def feedback(self, feedback: Feedback) -> None:
        """Record what became of one yielded batch, then let the sizing rule pick the next size.

        Raises ``ValueError`` when the kept and dropped indices are not exactly batches (or
        chunks) this sampler yielded and has not had feedback for. Under DDP every rank must call
        it once per step: the ranks' feedback is gathered, every rank counts all of it, and every
        rank's sizing rule sees the same merged numbers (see
        :func:`adaptive_batch.distributed.merge_for_sizing`), so sizes agree.
        """
        local = distributed.cpu_feedback(feedback)
        self.ledger.settle(torch.cat([local.kept, local.dropped]))
        items = distributed.gather(local) if self.num_replicas > 1 else [local]
        for item in items:
            self.ledger.record(item.kept, item.dropped)
        self.ledger.num_feedback += 1
        self.last_feedback = feedback
        if self.sizing is None:
            return
        merged = distributed.merge_for_sizing(items) if len(items) > 1 else local
        progress = Progress(
            self.ledger.num_feedback, self.ledger.num_samples, self.shard_size * self.num_replicas
        )
        requested = float(self.sizing.next_batch_size(self._batch_size, merged, progress))
        if not math.isnan(requested):  # a rule's NaN never changes the size
            self.requested_batch_size = requested
            self._batch_size = self._clamp(requested)

    def _clamp(self, size: float) -> int:
        low, high = self.min_batch_size, self.max_batch_size
        size = min(max(size, low), high)  # also maps +-inf to the caps
        if self.buckets is not None:
            return self.buckets.nearest(size, low, high)
        return round(size)

    # -- checkpointing --------------------------------------------------------------------------

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
            "chunk_size": self.chunk_size,
            "buckets": repr(self.buckets),
            "num_replicas": self.num_replicas,
            "sizing": type(self.sizing).__name__ if self.sizing is not None else None,
        }

    def _check_config(self, state: dict[str, Any]) -> None:
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

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state. Without a ``chunk_size``: everything needed to continue with the
        same batches (epoch, position, size, the sizing rule, the per-index counters). With one:
        only the position in the chunk stream -- the sizing side belongs to the consumer, which
        saves :meth:`consumer_state_dict` (the SubsetFilter does)."""
        state = {
            "version": _STATE_VERSION,
            "config": self._config(),
            "epoch": self._epoch,
            "position": self._position,
        }
        if self.chunk_size is None:
            state.update(self._sizing_state())
            if self.is_adaptive and self.ledger.in_flight and not self._warned_in_flight:
                self._warned_in_flight = True
                warnings.warn(
                    f"AdaptiveBatchSampler.state_dict() taken with {len(self.ledger.in_flight)} "
                    "batches awaiting feedback (a loader prefetching ahead of it): a run resumed "
                    "from it cannot repeat the uninterrupted run's batch sizes. Use chunk_size=... "
                    "for exact resumption.",
                    stacklevel=2,
                )
        return state

    def _sizing_state(self) -> dict[str, Any]:
        return {
            "batch_size": self._batch_size,
            "requested_batch_size": self.requested_batch_size,
            "decisions": self._decisions,
            "sizing": self.sizing.state_dict() if self.sizing is not None else None,
            "ledger": self.ledger.state_dict(),
            "num_dropped_tails": self.num_dropped_tails,
        }

    def _load_sizing_state(self, state: dict[str, Any]) -> None:
        if self.sizing is not None:
            self.sizing.load_state_dict(state["sizing"])
        self._batch_size = state["batch_size"]
        self.requested_batch_size = state["requested_batch_size"]
        self._decisions = state["decisions"]
        self.ledger.load_state_dict(state["ledger"])
        self.num_dropped_tails = state["num_dropped_tails"]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the next ``iter()`` resumes at the saved position."""
        self._check_config(state)
        if self.chunk_size is None:
            self._load_sizing_state(state)
        self.ledger.in_flight.clear()
        self._epoch = state["epoch"]
        self._position = state["position"]
        self._resume = True

    def consumer_state_dict(self) -> dict[str, Any]:
        """Chunk mode: the sizing side, as of the last batch consumed (saved by the consumer)."""
        if self.chunk_size is None:
            raise TypeError(
                "consumer_state_dict() is for samplers with a chunk_size; use state_dict()"
            )
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "epoch": self._epoch,
            "consumed": self._consumed,
            **self._sizing_state(),
        }

    def load_consumer_state_dict(self, state: dict[str, Any]) -> None:
        """Chunk mode: restore the sizing side; the next pass hands out chunks from the last
        consumed one (a restoring StatefulDataLoader agrees, as its snapshot is of that chunk)."""
        if self.chunk_size is None:
            raise TypeError("load_consumer_state_dict() is for samplers with a chunk_size")
        self._check_config(state)
        self._load_sizing_state(state)
        self._epoch = state["epoch"]
        self._position = self._consumed = state["consumed"]
        self._resume = True
