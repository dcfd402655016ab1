"""``torchdata.nodes`` nodes (``pip install 'adaptive-batch[torchdata]'``)."""

from .select.node import SubsetFilterNode

__all__ = ["SubsetFilterNode"]
