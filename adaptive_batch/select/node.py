"""SubsetFilterNode: the SubsetFilter as a ``torchdata.nodes`` node (needs the torchdata extra)."""

from __future__ import annotations

from typing import Any

from ..errors import AdaptiveBatchTypeError
from ..load import ChunkAssembler
from ..optional import require
from .filter import SubsetFilter

__all__ = ["SubsetFilterNode"]

nodes = require("torchdata.nodes", "torchdata", "SubsetFilterNode")


class SubsetFilterNode(nodes.BaseNode):
    """Keeps the best subset of each batch from ``source``; resumable through ``Loader.state_dict()``.

    Takes the keyword arguments of :class:`~adaptive_batch.SubsetFilter`; with a chunked sampler
    it assembles each batch from the source's chunks. Its state is the source's state and the
    filter's (selection rule, counters and, with chunks, the sampler's feedback side);
    ``reset()`` without a state starts a new pass of the source but keeps the rules' running
    statistics, which span epochs.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import TensorDataset
        >>> from torchdata.nodes import Loader, Mapper, SamplerWrapper
        >>> from adaptive_batch import AdaptiveBatchSampler, IndexedDataset, fetch_batch
        >>> from adaptive_batch.policies import EDBA
        >>> ds = IndexedDataset(TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,))))
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> sampler = AdaptiveBatchSampler(ds, policy=EDBA(), batch_size=10, min_batch_size=5)
        >>> batches = Mapper(SamplerWrapper(sampler), lambda idx: fetch_batch(ds, idx))
        >>> loader = Loader(SubsetFilterNode(batches, model, sampler=sampler))
        >>> sum(len(y) for x, y in loader) <= 40
        True
    """

    SOURCE_KEY = "source"
    FILTER_KEY = "filter"

    def __init__(self, source: Any, probe: Any, **filter_kwargs: Any) -> None:
        super().__init__()
        if not isinstance(source, nodes.BaseNode):
            raise AdaptiveBatchTypeError(
                f"source must be a torchdata.nodes.BaseNode; got {type(source).__name__}"
            )
        self.source = source
        self.filter = SubsetFilter(None, probe, **filter_kwargs)
        self._assembler = (
            ChunkAssembler(self.filter.sampler) if self.filter.assembles_chunks else None
        )  # type: ignore[arg-type]

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        if self._assembler is not None:
            self._assembler.reset()
        self.filter.start_epoch()
        if initial_state is None:
            self.source.reset()
        else:
            # The filter first: with a chunked sampler it restores the sampler's feedback side,
            # and the source's reset then resumes the sampler's pass at the restored position.
            self.filter.load_state_dict(initial_state[self.FILTER_KEY])
            self.source.reset(initial_state[self.SOURCE_KEY])

    def next(self) -> Any:
        if self._assembler is None:
            try:
                batch = next(self.source)
            except StopIteration:
                self.filter.end_epoch()
                raise
        else:
            batch = self._assembler.next_batch(self.source)
            if batch is None:
                self.filter.end_epoch()
                raise StopIteration
        return self.filter.filter_batch(batch)

    def get_state(self) -> dict[str, Any]:
        return {
            self.SOURCE_KEY: self.source.state_dict(),
            self.FILTER_KEY: self.filter.state_dict(),
        }
