"""StepFeedbackNode: StepFeedback as a ``torchdata.nodes`` node (needs the torchdata extra)."""

from __future__ import annotations

from typing import Any

from ..errors import AdaptiveBatchTypeError
from ..optional import require
from .step_feedback import StepFeedback

__all__ = ["StepFeedbackNode"]

nodes = require("torchdata.nodes", "torchdata", "StepFeedbackNode")


class StepFeedbackNode(nodes.BaseNode):
    """Yields ``source``'s batches unchanged and reports each one's feedback from the training
    forward; resumable through ``Loader.state_dict()``.

    Takes the arguments of :class:`~adaptive_batch.StepFeedback` (``model``, ``sampler=``,
    ``head=``, ``loss=``, ``targets=``); with a chunked sampler it assembles each batch from the
    source's chunks. Its state is the source's and the stage's (with chunks, the sampler's
    feedback side); taking it reports the batch just trained first.

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

    SOURCE_KEY = "source"
    STAGE_KEY = "stage"

    def __init__(self, source: Any, model: Any = None, **stage_kwargs: Any) -> None:
        super().__init__()
        if not isinstance(source, nodes.BaseNode):
            raise AdaptiveBatchTypeError(
                f"source must be a torchdata.nodes.BaseNode; got {type(source).__name__}"
            )
        self.source = source
        self.stage = StepFeedback(None, model, **stage_kwargs)

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self.stage.start_pass()
        if initial_state is None:
            self.source.reset()
        else:
            self.stage.load_state_dict(initial_state[self.STAGE_KEY])
            self.source.reset(initial_state[self.SOURCE_KEY])

    def next(self) -> Any:
        batch = self.stage.next_from(self.source)
        if batch is None:
            raise StopIteration
        return batch

    def get_state(self) -> dict[str, Any]:
        stage = self.stage.state_dict()  # reports the batch just trained, first
        return {self.SOURCE_KEY: self.source.state_dict(), self.STAGE_KEY: stage}
