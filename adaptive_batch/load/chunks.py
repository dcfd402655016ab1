"""ChunkAssembler: batches of the size the sampler plans now, joined from its chunks.

With ``AdaptiveBatchSampler(..., chunk_size=g)`` the loader fetches fixed chunks of ``g`` indices,
whose order never depends on feedback, so workers and prefetchers may run as far ahead as they
like; the assembler decides each batch's size when the batch is consumed, after all earlier
feedback. It is the one place that does so: :class:`~adaptive_batch.SubsetFilter` and
:class:`~adaptive_batch.nodes.SubsetFilterNode` both call it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..contract import ChunkPlanner
from ..errors import AdaptiveBatchError
from .batch_structure import concat
from .indexed import IndexedSample, split_indexed

__all__ = ["ChunkAssembler"]


class ChunkAssembler:
    """Joins the chunks of one pass of the source into candidate batches.

    Use one per pass over the source (each ``iter()`` of a filter, each ``reset()`` of a node).
    It learns from the first chunk how many indices its pass hands out in all and counts them
    down, so a source started lazily (a generator or ``tqdm`` around a loader), a resumed pass or
    another iterator elsewhere cannot mislead it. It pulls exactly the chunks of the batch it
    builds -- a checkpoint taken after a batch holds no chunk the batch did not use -- and it
    reads the source until the source itself ends, so everything upstream (``SamplerWrapper``,
    ``tqdm``, the loader) sees its pass end. The end of the pass is folded by the planner
    (:func:`~adaptive_batch.fold_tail`): no short last batch where the caps allow one that is not.

    Example:
        >>> import torch
        >>> from adaptive_batch import AdaptiveBatchSampler, IndexedDataset, fetch_batch
        >>> data = IndexedDataset(torch.arange(17.0))
        >>> sampler = AdaptiveBatchSampler(17, batch_size=8, min_batch_size=2, chunk_size=8)
        >>> chunks = (fetch_batch(data, c) for c in sampler)
        >>> assembler = ChunkAssembler(sampler)
        >>> sizes = []
        >>> while (batch := assembler.next_batch(chunks)) is not None:
        ...     sizes.append(len(batch.index))
        >>> sizes  # chunks of 8, 8 and 1: the last joins its predecessor
        [8, 9]
    """

    def __init__(self, planner: ChunkPlanner) -> None:
        if planner.chunk_size is None:
            raise AdaptiveBatchError("batches are assembled from chunks only with a chunk_size")
        self.planner = planner
        self.reset()

    def reset(self) -> None:
        """Forget the pass (call before reading a new pass of the source)."""
        self._total: int | None = None
        self._consumed = 0

    @property
    def remaining(self) -> int | None:
        """Indices of the current pass not yet assembled (``None`` before its first chunk)."""
        return None if self._total is None else self._total - self._consumed

    def next_batch(self, chunks: Iterator[Any]) -> IndexedSample | None:
        """The next batch from ``chunks`` (an iterator), or ``None`` once the source has ended."""
        first = self._pull(chunks)
        if first is None:
            return None
        wanted = self.planner.plan_batch(self._total - self._consumed + len(first[0]))  # type: ignore[operator]
        parts = [first]
        count = len(first[0])
        while count < wanted:
            chunk = self._pull(chunks)
            if chunk is None:  # the source ended early: keep what it gave, drop nothing
                break
            parts.append(chunk)
            count += len(chunk[0])
        indices = [p[0] for p in parts]
        lengths = [i.numel() for i in indices]
        return IndexedSample(torch.cat(indices), concat([p[1] for p in parts], lengths))

    def _pull(self, chunks: Iterator[Any]) -> tuple[Tensor, Any] | None:
        try:
            chunk = next(chunks)
        except StopIteration:
            return None
        indices, sample = split_indexed(chunk, required=True)
        assert indices is not None
        total = self.planner.pass_total(indices)
        if self._total is None:
            self._total = total
        elif total != self._total:
            raise AdaptiveBatchError(
                "the chunks come from more than one pass of the sampler: give each consumer a "
                "source of its own (one iterator over the loader per filter)"
            )
        self._consumed += indices.numel()
        return indices, sample
