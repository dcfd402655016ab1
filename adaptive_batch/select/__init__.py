"""Stage 4, select: keep the best subset of each candidate batch and report to the sampler.

:class:`SubsetFilter` wraps any iterable of batches; :class:`~adaptive_batch.nodes.SubsetFilterNode` (imported
from :mod:`adaptive_batch.nodes`, which needs torchdata) is the same stage as a
``torchdata.nodes`` node. Both assemble batches from a chunked sampler's chunks with the one
:class:`~adaptive_batch.load.ChunkAssembler`.
"""

from .filter import SubsetFilter

__all__ = ["SubsetFilter"]
