"""adaptive_batch: pick which samples and how many go into each training step.

The stages, in the order data moves (each a subpackage), and the messages between them
(:mod:`adaptive_batch.contract`)::

    sample/  AdaptiveBatchSampler --indices--> load/  DataLoader + IndexedDataset (or chunks)
                    ^                                   |
                    |                                   v  candidate batch
                    |                           probe/  HeadProbe --ProbeResult-->
                    |                           select/ SubsetFilter (policy's selection rule)
                    +------------- Feedback ------------+   |
                                                            v  kept subset
                                                    train/  your loop (BatchSizeLR, PerLayerBackward)

Policies (:mod:`adaptive_batch.policies`) decide; the application wing (:mod:`adaptive_batch.app`:
the command line, the demo, the benchmarks) uses all of it and is used by none of it.
"""

from .contract import Feedback, GradientNoise, ProbeResult, Progress, Reason, Selection
from .errors import (
    AdaptiveBatchError,
    AdaptiveBatchKeyError,
    AdaptiveBatchTypeError,
    AdaptiveBatchWarning,
)
from .load import IndexedDataset, IndexedSample, fetch_batch
from .observe import TrajectoryLogger
from .probe import HeadProbe, find_head
from .sample import AdaptiveBatchSampler, SizeBuckets, fold_tail
from .select import SubsetFilter
from .train import BatchSizeLR, PerLayerBackward, StepFeedback, WeightedLoss

__version__ = "0.2.0"

__all__ = [
    "AdaptiveBatchError",
    "AdaptiveBatchKeyError",
    "AdaptiveBatchSampler",
    "AdaptiveBatchTypeError",
    "AdaptiveBatchWarning",
    "BatchSizeLR",
    "Feedback",
    "GradientNoise",
    "HeadProbe",
    "IndexedDataset",
    "IndexedSample",
    "PerLayerBackward",
    "ProbeResult",
    "Progress",
    "Reason",
    "Selection",
    "SizeBuckets",
    "StepFeedback",
    "SubsetFilter",
    "TrajectoryLogger",
    "WeightedLoss",
    "__version__",
    "fetch_batch",
    "find_head",
    "fold_tail",
]
