"""ChunksInFlight: which pass handed out each chunk not yet consumed (chunk mode).

A consumer that assembles batches from chunks (:class:`~adaptive_batch.load.ChunkAssembler`)
needs to know where the pass that handed out a chunk ends. The sampler remembers it per chunk in
flight -- keyed by the chunk's first index -- and forgets it when the chunk is consumed: memory
grows with the chunks a loader holds, never with the dataset.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..errors import AdaptiveBatchError

__all__ = ["ChunksInFlight"]

#: Chunks remembered at most (a loader that abandons passes leaves some behind: the oldest go).
MAX_CHUNKS_IN_FLIGHT = 1 << 16


class ChunksInFlight:
    """The pass totals of the chunks handed out and not yet consumed."""

    def __init__(self) -> None:
        self._totals: OrderedDict[int, list[int]] = OrderedDict()

    def handed_out(self, chunk: np.ndarray, pass_total: int) -> None:
        if chunk.size:
            self._totals.setdefault(int(chunk[0]), []).append(pass_total)
            if len(self._totals) > MAX_CHUNKS_IN_FLIGHT:
                self._totals.popitem(last=False)

    def consumed(self, chunk: np.ndarray, awaiting: bool) -> int:
        """The total of the pass that handed out ``chunk`` (``awaiting``: whether its indices
        await feedback); refused for a chunk this sampler did not hand out."""
        totals = self._totals.get(int(chunk[0])) if chunk.size else None
        if not totals or not awaiting:
            raise AdaptiveBatchError(
                "a chunk names dataset indices this sampler did not hand out as chunks: batches "
                "assembled from chunks need IndexedDataset(dataset) and the sampler's own loader"
            )
        total = totals.pop(0)
        if not totals:
            del self._totals[int(chunk[0])]
        return total

    def clear(self) -> None:
        self._totals.clear()
