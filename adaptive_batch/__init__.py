"""adaptive_batch: pick which samples and how many go into each training step.

The parts, wired as in a training loop::

    AdaptiveBatchSampler --indices--> DataLoader --batch--> SubsetFilter --kept subset--> your loop
             ^                                                   |
             +---------- Feedback (statistics, dataset indices) --+   (HeadProbe scores each batch)
"""

from .buckets import SizeBuckets
from .feedback import Feedback, Progress, Reason, Selection
from .filter import SubsetFilter
from .indexed import IndexedDataset, IndexedSample, fetch_batch
from .lr_coupling import BatchSizeLR
from .per_layer import PerLayerBackward
from .probe import HeadProbe, find_head
from .probe_result import ProbeResult
from .sampler import AdaptiveBatchSampler

__version__ = "0.1.0"

__all__ = [
    "AdaptiveBatchSampler",
    "BatchSizeLR",
    "Feedback",
    "HeadProbe",
    "IndexedDataset",
    "IndexedSample",
    "PerLayerBackward",
    "ProbeResult",
    "Progress",
    "Reason",
    "Selection",
    "SizeBuckets",
    "SubsetFilter",
    "__version__",
    "fetch_batch",
    "find_head",
]
