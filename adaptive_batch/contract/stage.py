"""The stage protocol: what both stages (:class:`~adaptive_batch.SubsetFilter` and
:class:`~adaptive_batch.StepFeedback`) offer whoever drives them -- a loop, a ``torchdata.nodes``
node, a trainer -- so one node and one trainer callback serve both."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

__all__ = ["Stage"]


@runtime_checkable
class Stage(Protocol):
    """A stage between the loader and the training step.

    Attributes:
        sampler: the sampler it reports to (``None``: a filter that only selects).
        fetched_ahead: whether a trainer fetches batches ahead of their steps and announces each
            step with :meth:`begin_batch` and :meth:`end_batch`.
    """

    sampler: Any
    fetched_ahead: bool

    def start_pass(self) -> None:
        """Begin a pass over the source (``iter()`` does; a node on ``reset()``): forget what
        was fetched for an earlier pass, start assembling chunks anew."""

    def next_from(self, source: Iterator[Any]) -> Any:
        """The next batch for the training step from ``source`` (``None`` at its end)."""

    def begin_batch(self) -> None:
        """A trainer that fetched ahead starts the step of the oldest batch fetched."""

    def end_batch(self) -> None:
        """A trainer that fetched ahead finished the step begun last."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
