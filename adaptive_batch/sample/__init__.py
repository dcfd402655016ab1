"""Stage 1, sample: which dataset indices the next candidate batch holds, and how many.

:class:`AdaptiveBatchSampler` composes an :class:`~.order.IndexOrder` (the index set, each
epoch's order, the rank's share), a :class:`~.sizer.BatchSizer` (the caps, buckets and sizing
rule), a :class:`~.ledger.FeedbackLedger` (per index: awaiting feedback, kept, dropped) and, under
DDP, a :class:`~.distributed.RankSync`. Each ``iter()`` is a :class:`~.passes.SamplerPass`.
"""

from .buckets import SizeBuckets, as_buckets
from .sampler import AdaptiveBatchSampler
from .sizer import fold_tail

__all__ = ["AdaptiveBatchSampler", "SizeBuckets", "as_buckets", "fold_tail"]
