"""``torchdata.nodes`` nodes (``pip install 'adaptive-batch[torchdata]'``): one node drives either
stage through the :class:`~adaptive_batch.contract.Stage` protocol."""

from __future__ import annotations

from typing import Any

from .contract import Stage
from .errors import AdaptiveBatchTypeError
from .optional import require
from .select import SubsetFilter
from .train import StepFeedback

__all__ = ["StageNode", "StepFeedbackNode", "SubsetFilterNode"]

nodes = require("torchdata.nodes", "torchdata", "adaptive_batch.nodes")


class StageNode(nodes.BaseNode):
    """A stage (:class:`~adaptive_batch.SubsetFilter` or :class:`~adaptive_batch.StepFeedback`,
    built with ``None`` for its batches) over a ``source`` node; resumable through
    ``Loader.state_dict()``. With a chunked sampler the stage assembles each batch from the
    source's chunks. Its state is the source's and the stage's; ``reset()`` without a state starts
    a new pass of the source but keeps the rules' running statistics, which span epochs.
    """

    SOURCE_KEY = "source"
    STAGE_KEY = "stage"

    def __init__(self, source: Any, stage: Stage) -> None:
        super().__init__()
        if not isinstance(source, nodes.BaseNode):
            raise AdaptiveBatchTypeError(
                f"source must be a torchdata.nodes.BaseNode; got {type(source).__name__}"
            )
        if not isinstance(stage, Stage):
            raise AdaptiveBatchTypeError(
                f"stage must be a SubsetFilter or StepFeedback; got {type(stage).__name__}"
            )
        self.source = source
        self.stage = stage

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self.stage.start_pass()
        if initial_state is None:
            self.source.reset()
        else:
            # The stage first: with a chunked sampler it restores the sampler's feedback side,
            # and the source's reset then resumes the sampler's pass at the restored position.
            self.stage.load_state_dict(initial_state[self.STAGE_KEY])
            self.source.reset(initial_state[self.SOURCE_KEY])

    def next(self) -> Any:
        batch = self.stage.next_from(self.source)
        if batch is None:
            raise StopIteration
        return batch

    def get_state(self) -> dict[str, Any]:
        stage = self.stage.state_dict()  # first: StepFeedback reports the batch just trained
        return {self.SOURCE_KEY: self.source.state_dict(), self.STAGE_KEY: stage}


class SubsetFilterNode(StageNode):
    """Keeps the best subset of each batch from ``source``: a :class:`StageNode` around a
    :class:`~adaptive_batch.SubsetFilter` built from the keyword arguments.

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

    STAGE_KEY = "filter"  # the key of checkpoints written before the nodes were one

    def __init__(self, source: Any, probe: Any, **filter_kwargs: Any) -> None:
        super().__init__(source, SubsetFilter(None, probe, **filter_kwargs))

    @property
    def filter(self) -> SubsetFilter:
        return self.stage  # type: ignore[return-value]


class StepFeedbackNode(StageNode):
    """Yields ``source``'s batches unchanged and reports each one's feedback from the training
    forward: a :class:`StageNode` around a :class:`~adaptive_batch.StepFeedback` built from the
    arguments (``model``, ``sampler=``, ``head=``, ``loss=``, ``targets=``). Taking its state
    reports the batch just trained first.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import TensorDataset
        >>> from torchdata.nodes import Loader, Mapper, SamplerWrapper
        >>> from adaptive_batch import AdaptiveBatchSampler, IndexedDataset, fetch_batch
        >>> ds = IndexedDataset(TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,))))
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> sampler = AdaptiveBatchSampler(ds, batch_size=10, min_batch_size=5)
        >>> batches = Mapper(SamplerWrapper(sampler), lambda idx: fetch_batch(ds, idx))
        >>> loader = Loader(StepFeedbackNode(batches, model, sampler=sampler))
        >>> for x, y in loader:
        ...     nn.functional.cross_entropy(model(x), y).backward()
        >>> sampler.num_feedback
        4
    """

    def __init__(self, source: Any, model: Any = None, **stage_kwargs: Any) -> None:
        super().__init__(source, StepFeedback(None, model, **stage_kwargs))
