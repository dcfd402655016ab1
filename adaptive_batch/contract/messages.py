"""The messages the stages exchange: plain tensors and numbers, no model, no loader.

::

    probe  --ProbeResult-->  selection rule  --Selection-->  filter  --Feedback-->  sampler
                                                                                      |
    sizing rule  <--Feedback, Progress--------------------------------------------------+

A probe measures a candidate batch (:class:`ProbeResult`: per-sample losses and the Gram matrix of
per-sample gradients); a selection rule keeps part of it (:class:`Selection`: positions); the
filter reports to the sampler (:class:`Feedback`: dataset indices kept and dropped, statistics);
the sampler's sizing rule picks the next size from it and a :class:`Progress`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import AdaptiveBatchError, renamed_arguments

__all__ = [
    "EpochPlan",
    "Feedback",
    "FeedbackGroup",
    "GradientNoise",
    "LayerSelection",
    "ProbeResult",
    "Progress",
    "Reason",
    "ScoreTable",
    "Selection",
]


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
    UNMEASURED = "unmeasured"  #: the training step's forward of the batch was not seen

    ALL = (SELECTED, KEEP_ALL, WARMUP, SINGLE_SAMPLE, NONFINITE, DEGENERATE, UNMEASURED)


@dataclass(frozen=True)
class ProbeResult:
    """Per-sample statistics of one candidate batch of ``B`` samples.

    Attributes:
        losses: ``[B]`` per-sample losses, on the model's device.
        gram: ``[B, B]`` Gram matrix of per-sample gradients, ``gram[i, j] = g_i . g_j``.
            Every quantity selection needs from the gradients is a quadratic form in it: the
            squared norm of a subset's mean gradient is ``s^T K s / |S|^2``.
        features: ``[B, ...]`` the head's inputs, kept for rules that want them (may be ``None``).
        logits: ``[B, ...]`` the head's outputs (may be ``None``).

    Example:
        >>> import torch
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # three per-sample gradients
        >>> r = ProbeResult(losses=torch.zeros(3), gram=g @ g.T)
        >>> r.grad_sq_norms().tolist()
        [1.0, 1.0, 2.0]
        >>> r.subset_mean_grad_sq_norms(torch.tensor([[1.0, 1.0, 0.0]])).tolist()  # mean of g0, g1
        [0.5]
    """

    losses: Tensor
    gram: Tensor
    features: Tensor | None = None
    logits: Tensor | None = None

    def __post_init__(self) -> None:
        b = self.losses.shape[0] if self.losses.dim() == 1 else -1
        if b < 0 or self.gram.shape != (b, b):
            raise AdaptiveBatchError(
                f"ProbeResult needs losses of shape [B] and gram of shape [B, B]; got "
                f"{tuple(self.losses.shape)} and {tuple(self.gram.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.losses.shape[0]

    @property
    def device(self) -> torch.device:
        return self.losses.device

    def grad_sq_norms(self) -> Tensor:
        """``[B]`` squared norms of the per-sample gradients, ``||g_i||^2``."""
        return self.gram.diagonal()

    def subset_mean_grad_sq_norms(self, weights: Tensor) -> Tensor:
        """Squared norm of the weighted mean gradient of each row of ``weights``.

        Args:
            weights: ``[S, B]`` non-negative weights (a 0/1 mask selects a subset). Each row must
                have a positive sum.

        Returns:
            ``[S]`` tensor: ``||sum_i w_i g_i / sum_i w_i||^2`` per row, clamped at 0 against
            round-off.
        """
        w = weights.to(device=self.gram.device, dtype=self.gram.dtype)
        quad = ((w @ self.gram) * w).sum(dim=1)
        return (quad / w.sum(dim=1).square()).clamp_min(0.0)

    def mean_grad_sq_norm(self) -> Tensor:
        """Scalar tensor: ``||mean_i g_i||^2`` over the whole batch."""
        return (self.gram.sum() / self.batch_size**2).clamp_min(0.0)

    def grad_variance(self) -> Tensor:
        """Scalar tensor: trace of the within-batch covariance of per-sample gradients.

        ``mean_i ||g_i||^2 - ||mean_i g_i||^2`` (the population variance, as CABS defines xi).
        """
        return (self.grad_sq_norms().mean() - self.mean_grad_sq_norm()).clamp_min(0.0)


def _as_positions(kept: Tensor | list[int], size: int) -> Tensor:
    kept = torch.as_tensor(kept, dtype=torch.long).flatten().cpu()
    if kept.numel() == 0:
        raise AdaptiveBatchError("a selection must keep at least one sample")
    if kept.min() < 0 or kept.max() >= size:
        raise AdaptiveBatchError(f"selected positions must lie in [0, {size}); got {kept.tolist()}")
    kept = kept.sort().values
    if bool((kept[1:] == kept[:-1]).any()):
        raise AdaptiveBatchError(f"selected positions must be distinct; got {kept.tolist()}")
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
            raise AdaptiveBatchError(
                f"unknown selection reason {self.reason!r}; use one of {Reason.ALL}"
            )
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


@dataclass
class LayerSelection:
    """The subsets a per-layer rule (DBA) chose for one batch: a boolean mask per layer."""

    masks: dict[str, Tensor]
    reason: str
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def kept_fraction(self) -> float:
        """Mean over layers of the fraction of the batch each layer uses."""
        return sum(float(m.float().mean()) for m in self.masks.values()) / len(self.masks)


@dataclass(frozen=True)
class Feedback:
    """What a stage reports to the sampler about one candidate batch.

    Attributes:
        kept: dataset indices of the samples trained on (CPU ``long``).
        dropped: dataset indices of the candidates left out (CPU ``long``).
        reason: the selection's :class:`Reason`.
        stats: batch statistics and the selection rule's own numbers. Both
            :class:`~adaptive_batch.SubsetFilter` and :class:`~adaptive_batch.StepFeedback` report
            ``loss`` (mean candidate loss), ``grad_sq_norm`` (``||mean g||^2`` of the per-sample
            head gradients) and ``grad_variance`` (the trace of their covariance); the filter adds
            ``kept_grad_sq_norm`` (``||mean g||^2`` over the kept samples).
        losses: per-sample losses of the candidates, in the order of :attr:`candidates` (kept,
            then dropped), or ``None``. The sampler keeps each index's latest loss for epoch
            plans (:class:`ScoreTable`).
    """

    kept: Tensor
    dropped: Tensor
    reason: str = Reason.KEEP_ALL
    stats: Mapping[str, float] = field(default_factory=dict)
    losses: Tensor | None = None

    def __post_init__(self) -> None:
        if self.losses is not None and self.losses.shape != (self.batch_size,):
            raise AdaptiveBatchError(
                f"feedback losses must have one entry per candidate ({self.batch_size}); got "
                f"shape {tuple(self.losses.shape)}"
            )

    @property
    def candidates(self) -> Tensor:
        """Every candidate's dataset index: the kept, then the dropped."""
        return torch.cat([self.kept.flatten(), self.dropped.flatten()])

    @property
    def batch_size(self) -> int:
        """Number of candidates in the batch this feedback is about."""
        return self.kept.numel() + self.dropped.numel()

    @property
    def num_kept(self) -> int:
        return self.kept.numel()


@dataclass
class FeedbackGroup:
    """The feedback of several consecutive batches, reported at once: what a stage sends when
    nothing reads feedback batch by batch (an epoch plan, no sizing rule, no listener, one
    process), so that the per-batch work of reporting is paid once per group.

    Attributes:
        candidates: dataset indices (CPU ``long``) of every batch's candidates, batch after
            batch; an index may appear in more than one batch (the latest counts for its loss).
        kept: which candidates were trained on (``bool``, as ``candidates``; ``None``: all).
        losses: per-sample losses, as ``candidates`` (``None``: none measured).
        batches: how many batches the group reports (each counts as one feedback).
        last: builds the :class:`Feedback` of the group's last batch (only when someone asks
            for the latest feedback).
    """

    candidates: Tensor
    kept: Tensor | None
    losses: Tensor | None
    batches: int
    last: Callable[[], Feedback]

    def __post_init__(self) -> None:
        shape = tuple(self.candidates.shape)
        for name in ("kept", "losses"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise AdaptiveBatchError(
                    f"a feedback group's {name} must have one entry per candidate {shape}; got "
                    f"shape {tuple(value.shape)}"
                )
        if self.batches < 1:
            raise AdaptiveBatchError(
                f"a feedback group reports 1 batch or more; got {self.batches}"
            )


@dataclass(frozen=True, init=False)
class Progress:
    """How far training has come, as the sampler counts it; passed to sizing rules.

    Attributes:
        updates: batches fed back so far, this one included.
        candidates: candidates fed back so far, this batch included (over all ranks).
        epoch_size: candidates per epoch (the epoch's share of the index set, over all ranks).
    """

    updates: int
    candidates: int
    epoch_size: int

    @renamed_arguments(samples="candidates")
    def __init__(self, updates: int, candidates: int, epoch_size: int) -> None:
        object.__setattr__(self, "updates", updates)
        object.__setattr__(self, "candidates", candidates)
        object.__setattr__(self, "epoch_size", epoch_size)

    @property
    def samples(self) -> int:
        """The old name of :attr:`candidates`."""
        return self.candidates

    @property
    def epochs(self) -> float:
        """Epochs of candidates fed back so far (fractional)."""
        return self.candidates / self.epoch_size

    @property
    def completed_epochs(self) -> int:
        return self.candidates // self.epoch_size


@dataclass(frozen=True)
class ScoreTable:
    """What the sampler knows of each index of its index set (positions as in
    ``sampler.indices``): what an epoch plan decides from.

    Attributes:
        losses: ``float32``: the latest per-sample loss feedback reported (``nan`` if none yet).
        times_kept, times_dropped: ``int32``: how often feedback kept or dropped it.
    """

    losses: Tensor
    times_kept: Tensor
    times_dropped: Tensor

    @property
    def scored(self) -> Tensor:
        """``bool``: the indices with a loss."""
        return ~self.losses.isnan()

    @classmethod
    def empty(cls, size: int) -> ScoreTable:
        """The table of ``size`` indices before any feedback."""
        counts = torch.zeros(size, dtype=torch.int32)
        return cls(torch.full((size,), float("nan")), counts, counts.clone())

    @classmethod
    def of_losses(cls, losses: Tensor) -> ScoreTable:
        """A table with these losses (``nan``: none yet) and no counts, for a plan's doctest or
        a test.

        Example:
            >>> import torch
            >>> ScoreTable.of_losses(torch.tensor([0.5, float("nan")])).scored.tolist()
            [True, False]
        """
        counts = torch.zeros(losses.numel(), dtype=torch.int32)
        return cls(losses.to(torch.float32), counts, counts.clone())


@dataclass(frozen=True)
class EpochPlan:
    """Which indices of the index set an epoch draws, and with what training weight.

    Attributes:
        drawn: ``bool`` over the index set: the indices the epoch draws (the sampler shuffles
            them with the epoch's seed and shares them among the ranks).
        weights: ``float32`` over the index set, or ``None`` (all 1): the weight a sample's loss
            should get when trained this epoch (InfoBatch's ``1 / (1 - r)`` for kept
            well-learned samples keeps the expected gradient unchanged).
        stats: numbers the rule measured (how many it dropped, its threshold...).
    """

    drawn: Tensor
    weights: Tensor | None = None
    stats: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.drawn.dtype != torch.bool or self.drawn.dim() != 1:
            raise AdaptiveBatchError("an epoch plan's drawn must be a 1-D bool tensor")
        if self.weights is not None and self.weights.shape != self.drawn.shape:
            raise AdaptiveBatchError("an epoch plan's weights must match drawn in shape")
        if not bool(self.drawn.any()):
            raise AdaptiveBatchError("an epoch plan must draw at least one index")

    @classmethod
    def everything(cls, size: int, **stats: float) -> EpochPlan:
        return cls(torch.ones(size, dtype=torch.bool), None, stats)


class GradientNoise(NamedTuple):
    """A sizing rule's running estimates of the gradient noise (AdaptDL's ``var`` and ``sqr``).

    Attributes:
        variance: ``tr(Sigma)``, the per-sample gradient variance.
        sq_norm: ``|G|^2``, the squared norm of the true gradient.
    """

    variance: float
    sq_norm: float
