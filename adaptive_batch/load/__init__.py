"""Stage 2, load: samples that carry their dataset index, batches kept in their structure, and
batches assembled from chunks where they are consumed."""

from .batch_structure import concat, get_field, take
from .chunks import ChunkAssembler
from .indexed import (
    IndexedDataset,
    IndexedSample,
    check_not_resharded,
    fetch_batch,
    split_indexed,
)

__all__ = [
    "ChunkAssembler",
    "IndexedDataset",
    "IndexedSample",
    "check_not_resharded",
    "concat",
    "fetch_batch",
    "get_field",
    "split_indexed",
    "take",
]
