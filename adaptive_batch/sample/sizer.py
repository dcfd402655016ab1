"""BatchSizer: how large the next batch is -- the sizing rule's answer within the caps and buckets,
folded at the end of an epoch so that no batch falls below the minimum where the caps allow."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from ..contract import Feedback, Progress, SizingRule, require_keys
from ..errors import AdaptiveBatchError
from .buckets import SizeBuckets

__all__ = ["BatchSizer", "fold_tail"]


def fold_tail(
    wanted: int, remaining: int, min_batch_size: int, max_batch_size: int, chunk_size: int = 1
) -> int:
    """Size of the next batch when ``remaining`` indices are left in the epoch.

    Takes ``wanted`` where it can, but never leaves a remainder smaller than ``min_batch_size``:
    the remainder joins this batch if that stays within ``max_batch_size``, else this batch gives
    up the fewest indices that let the remainder reach ``min_batch_size``. Batches are made of
    whole chunks of ``chunk_size`` (the last chunk of an epoch may be short). Only when neither is
    possible is the last batch short: with whole batches (``chunk_size=1``) when ``max_batch_size
    < 2 * min_batch_size - 1``, with chunks when ``max_batch_size < 2 * min_batch_size +
    chunk_size - 1``, or when fewer than ``min_batch_size`` indices are left in all.

    Example:
        >>> fold_tail(100, 105, 10, 1000)  # 5 would be left over: take them now
        105
        >>> fold_tail(1000, 1005, 10, 1000)  # 1005 > max: leave exactly 10 for the last batch
        995
        >>> fold_tail(8, 9, 2, 1000, chunk_size=8)  # chunks of 8 and 1: one batch of 9
        9
    """

    def size_of(chunks: int) -> int:
        return min(chunks * chunk_size, remaining)

    total_chunks = -(-remaining // chunk_size)
    chunks = min(max(wanted // chunk_size, 1), total_chunks)
    rest = remaining - size_of(chunks)
    if rest == 0 or rest >= min_batch_size:
        return size_of(chunks)
    if remaining <= max_batch_size:
        return remaining
    # The fewest trailing chunks that hold min_batch_size; this batch takes the ones before.
    last = remaining - (total_chunks - 1) * chunk_size
    trailing = 1 + max(0, -(-(min_batch_size - last) // chunk_size))
    if total_chunks - trailing >= 1 and size_of(total_chunks - trailing) >= min_batch_size:
        return size_of(total_chunks - trailing)
    return size_of(chunks)


class BatchSizer:
    """The current batch size and the rule that moves it.

    Args:
        rule: the sizing rule; ``None`` keeps ``batch_size``.
        batch_size, min_batch_size, max_batch_size: the start and the caps.
        buckets: the sizes allowed (``None``: any within the caps).
        chunk_size: batches are made of chunks of this many indices, so sizes are its multiples
            (then ``buckets`` must be ``None``).
        drop_last: an epoch's last batch is dropped when the caps leave it short.
        epoch_length: indices per epoch, to refuse a ``drop_last`` that would drop everything.

    The rule's answer is rounded to the nearest allowed size within ``[min_batch_size,
    max_batch_size]``, and never above what an epoch holds; ``nan`` leaves the size unchanged,
    ``+inf`` means "as large as allowed" (and is recorded as that size, so a learning rate coupled
    to the requested size is never driven to zero by it).
    """

    SIZE_KEY = "batch_size"
    REQUESTED_KEY = "requested_batch_size"
    RULE_KEY = "rule"
    DECISIONS_KEY = "decisions"
    LAGS_KEY = "lags"

    def __init__(
        self,
        rule: SizingRule | None,
        *,
        batch_size: int,
        min_batch_size: int,
        max_batch_size: int,
        buckets: SizeBuckets | None = None,
        chunk_size: int | None = None,
        drop_last: bool = False,
        epoch_length: int | None = None,
    ) -> None:
        if chunk_size is not None:
            if drop_last:
                raise AdaptiveBatchError(
                    "drop_last is not supported with chunk_size (chunks fold the tail)"
                )
            if buckets is not None:
                raise AdaptiveBatchError(
                    "chunk_size already rounds sizes to its multiples: give buckets or chunk_size"
                )
            if not 1 <= chunk_size <= max_batch_size:
                raise AdaptiveBatchError(
                    f"chunk_size must lie in [1, max_batch_size={max_batch_size}]; got {chunk_size}"
                )
            buckets = SizeBuckets(multiple=chunk_size)
        if not 1 <= min_batch_size <= max_batch_size:
            raise AdaptiveBatchError(
                f"need 1 <= min_batch_size <= max_batch_size; got {min_batch_size}, {max_batch_size}"
            )
        if buckets is not None and not buckets.within(min_batch_size, max_batch_size):
            raise AdaptiveBatchError(
                f"no size of {buckets} lies within [{min_batch_size}, {max_batch_size}]"
            )
        if drop_last and epoch_length is not None and epoch_length < min_batch_size:
            raise AdaptiveBatchError(
                f"with drop_last, an index set of {epoch_length} per replica (fewer than "
                f"min_batch_size={min_batch_size}) would never yield a batch"
            )
        self.rule = rule
        self.chunk_size = chunk_size
        self.drop_last = drop_last
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self.buckets = buckets
        if not self.allowed(batch_size):
            raise AdaptiveBatchError(
                f"batch_size {batch_size} is outside the allowed sizes: [min_batch_size, "
                f"max_batch_size] = [{min_batch_size}, {max_batch_size}]"
                + (f" and in {buckets}" if buckets else "")
            )
        self.size = batch_size
        self.requested: float = float(batch_size)
        self.decisions = 0
        self.lags: Counter[int] = Counter()

    @property
    def is_adaptive(self) -> bool:
        return self.rule is not None and self.min_batch_size < self.max_batch_size

    def allowed(self, size: int) -> bool:
        in_caps = self.min_batch_size <= size <= self.max_batch_size
        return in_caps and (self.buckets is None or self.buckets.contains(size))

    def update(self, feedback: Feedback, progress: Progress, epoch_length: int) -> None:
        """Ask the rule for the next size; ``epoch_length`` bounds what a batch can hold."""
        if self.rule is None:
            return
        current = min(self.size, epoch_length)
        requested = float(self.rule.next_batch_size(current, feedback, progress))
        if math.isnan(requested):
            return  # a rule's NaN never changes the size
        low = self.min_batch_size
        high = max(low, min(self.max_batch_size, epoch_length))
        size = min(max(requested, low), high)
        self.size = self.buckets.nearest(size, low, high) if self.buckets else round(size)
        self.requested = float(self.size) if math.isinf(requested) else requested

    def _decided(self, num_feedback: int) -> None:
        self.lags[self.decisions - num_feedback] += 1
        self.decisions += 1

    def decide(self, remaining: int, num_feedback: int, chunk_size: int = 1) -> int:
        """The next batch's size with ``remaining`` indices left in the epoch, decided after
        ``num_feedback`` batches' feedback (the difference to the decisions so far is the lag)."""
        self._decided(num_feedback)
        return fold_tail(self.size, remaining, self.min_batch_size, self.max_batch_size, chunk_size)

    def count_batches(self, epoch_length: int) -> int:
        """Batches in an epoch when the size cannot change."""
        remaining, count = epoch_length, 0
        while remaining > 0:
            size = fold_tail(self.size, remaining, self.min_batch_size, self.max_batch_size)
            count += not (size == remaining < self.min_batch_size and self.drop_last)
            remaining -= size
        return count

    def state_dict(self) -> dict[str, Any]:
        return {
            self.SIZE_KEY: self.size,
            self.REQUESTED_KEY: self.requested,
            self.RULE_KEY: self.rule.state_dict() if self.rule is not None else None,
            self.DECISIONS_KEY: self.decisions,
            self.LAGS_KEY: dict(self.lags),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        require_keys(self, state, (self.SIZE_KEY, self.REQUESTED_KEY, self.RULE_KEY))
        if self.rule is not None:
            self.rule.load_state_dict(state[self.RULE_KEY])
        self.size = state[self.SIZE_KEY]
        self.requested = state[self.REQUESTED_KEY]
        self.decisions = state.get(self.DECISIONS_KEY, 0)
        self.lags = Counter(state.get(self.LAGS_KEY, {}))
