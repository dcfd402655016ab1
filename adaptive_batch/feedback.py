"""The two messages of the feedback loop.

A selection rule turns a :class:`~adaptive_batch.ProbeResult` into a :class:`Selection`
(positions inside the candidate batch). The filter turns that into a :class:`Feedback`
(dataset indices) for the sampler, whose sizing rule picks the next batch size from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Feedback", "Progress", "Reason", "Selection"]


class Reason:
    """Why a selection kept what it kept; recorded in every :class:`Selection`.

    Every reason other than ``SELECTED`` keeps the whole candidate batch.
    """

    SELECTED = "selected"  #: the rule chose a subset (possibly the whole batch)
    KEEP_ALL = "keep_all"  #: the rule never filters
    WARMUP = "warmup"  #: running statistics not initialised yet
    SINGLE_SAMPLE = "single_sample"  #: a one-sample batch has no proper subset to choose
    NONFINITE = "nonfinite"  #: a loss or gradient statistic was NaN or inf
    DEGENERATE = "degenerate"  #: the score was undefined for every candidate subset

    ALL = (SELECTED, KEEP_ALL, WARMUP, SINGLE_SAMPLE, NONFINITE, DEGENERATE)


def _as_positions(kept: Tensor | list[int], size: int) -> Tensor:
    kept = torch.as_tensor(kept, dtype=torch.long).flatten().cpu()
    if kept.numel() == 0:
        raise ValueError("a selection must keep at least one sample")
    if kept.min() < 0 or kept.max() >= size:
        raise ValueError(f"selected positions must lie in [0, {size}); got {kept.tolist()}")
    kept = kept.sort().values
    if bool((kept[1:] == kept[:-1]).any()):
        raise ValueError(f"selected positions must be distinct; got {kept.tolist()}")
    return kept


@dataclass(frozen=True)
class Selection:
    """Which samples of a candidate batch to keep, and why.

    Attributes:
        kept: sorted, distinct positions in ``[0, batch_size)``, a CPU ``long`` tensor.
        batch_size: the candidate batch size ``B``.
        reason: one of :class:`Reason`.
        stats: numbers the rule measured (floats), passed on to the sampler's sizing rule.
    """

    kept: Tensor
    batch_size: int
    reason: str = Reason.SELECTED
    stats: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reason not in Reason.ALL:
            raise ValueError(f"unknown selection reason {self.reason!r}; use one of {Reason.ALL}")
        object.__setattr__(self, "kept", _as_positions(self.kept, self.batch_size))

    @classmethod
    def keep_all(cls, batch_size: int, reason: str, **stats: float) -> Selection:
        return cls(torch.arange(batch_size), batch_size, reason, stats)

    @property
    def dropped(self) -> Tensor:
        """Sorted positions not kept."""
        mask = torch.ones(self.batch_size, dtype=torch.bool)
        mask[self.kept] = False
        return mask.nonzero().flatten()


@dataclass(frozen=True)
class Feedback:
    """What the filter reports to the sampler about one candidate batch.

    Attributes:
        kept: dataset indices of the samples trained on (CPU ``long``).
        dropped: dataset indices of the candidates left out (CPU ``long``).
        reason: the selection's :class:`Reason`.
        stats: the probe's batch statistics and the selection rule's own numbers. Always present:
            ``loss`` (mean candidate loss), ``grad_sq_norm`` (``||mean g||^2`` over the
            candidates), ``grad_variance`` (trace of the per-sample gradient covariance),
            ``kept_grad_sq_norm`` (``||mean g||^2`` over the kept samples).
    """

    kept: Tensor
    dropped: Tensor
    reason: str = Reason.KEEP_ALL
    stats: Mapping[str, float] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Number of candidates in the batch this feedback is about."""
        return self.kept.numel() + self.dropped.numel()

    @property
    def num_kept(self) -> int:
        return self.kept.numel()


@dataclass(frozen=True)
class Progress:
    """How far training has come, as the sampler counts it; passed to sizing rules.

    Attributes:
        updates: batches fed back so far, this one included.
        samples: candidates fed back so far, this batch included.
        epoch_size: indices per epoch (the size of the sampler's index set).
    """

    updates: int
    samples: int
    epoch_size: int

    @property
    def epochs(self) -> float:
        """Epochs of candidates fed back so far (fractional)."""
        return self.samples / self.epoch_size

    @property
    def completed_epochs(self) -> int:
        return self.samples // self.epoch_size
