"""How StepFeedback's measured batches reach the sampler: each after a report lag (so a device's
copy to the host overlaps the next step), and, when nothing reads feedback batch by batch (an
epoch plan on one process, no sizing rule, no listener), a group of batches at once, so the
reporting's Python cost is paid once per group."""

from __future__ import annotations

import functools
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..contract import Feedback, FeedbackGroup, Reason
from ..probe import HostCopy

__all__ = ["GROUP_BATCHES", "STAT_NAMES", "Delivery", "InTransit", "group_of"]

#: Batches reported to the sampler at once when nothing reads feedback batch by batch.
GROUP_BATCHES = 32

STAT_NAMES = ("loss", "grad_sq_norm", "grad_variance")

_NO_INDICES = torch.empty(0, dtype=torch.long)  # every feedback's empty "dropped"


class _Warns(Protocol):
    def warn_nonfinite(self, bad: int, rows: int) -> None: ...


def _checked_sum(values: np.ndarray, stage: _Warns) -> float:
    """The losses' sum (one reduction), and the stage's warning if some are not finite (counted
    only then)."""
    total = float(values.sum(dtype=np.float64))
    if not math.isfinite(total):
        stage.warn_nonfinite(int((~np.isfinite(values)).sum()), values.size)
    return total


@dataclass
class InTransit:
    """A measured batch on its way to the sampler: its losses (after ``stats`` statistics, and
    followed by an in-batch rule's kept mask when ``selected``) copying to the host."""

    indices: Tensor
    copy: HostCopy | None  # None: unmeasured
    stats: int
    on_accelerator: bool = False
    selected: bool = False

    @classmethod
    def of(cls, indices: Tensor, packed: Tensor, stats: int, kept: Tensor | None) -> InTransit:
        """``packed`` (statistics and losses) and the kept mask, sent to the host in one copy."""
        if kept is not None:
            packed = torch.cat([packed, kept.to(packed.dtype)])
        on_accelerator = packed.device.type != "cpu"
        return cls(indices, HostCopy(packed), stats, on_accelerator, kept is not None)

    def feedback(self, stage: _Warns) -> Feedback:
        if self.copy is None:
            return Feedback(self.indices, _NO_INDICES, Reason.UNMEASURED, {"loss": math.nan})
        host = self.copy.result()
        rows = self.indices.numel()
        losses = host[self.stats : self.stats + rows]
        values = losses.numpy()
        total = _checked_sum(values, stage)
        if self.stats:
            stats = dict(zip(STAT_NAMES, host[: self.stats].tolist(), strict=True))
        else:
            stats = {"loss": total / values.size if values.size else math.nan}
        if self.selected:  # an in-batch rule chose: the kept, then the dropped
            kept = host[self.stats + rows :] > 0.5
            stats["kept_fraction"] = float(kept.float().mean())
            order = torch.cat([losses[kept], losses[~kept]])
            return Feedback(self.indices[kept], self.indices[~kept], Reason.SELECTED, stats, order)
        reason = Reason.KEEP_ALL if math.isfinite(stats["loss"]) else Reason.NONFINITE
        return Feedback(self.indices, _NO_INDICES, reason, stats, losses=losses)


def group_of(transits: list[InTransit], stage: _Warns) -> FeedbackGroup:
    """The measured batches ``transits`` (none unmeasured) as one :class:`FeedbackGroup`."""
    candidates, losses, kept = [], [], []
    selected = any(t.selected for t in transits)
    for t in transits:
        assert t.copy is not None
        host, rows = t.copy.result(), t.indices.numel()
        candidates.append(t.indices)
        losses.append(host[t.stats : t.stats + rows])
        if selected:
            kept.append(
                host[t.stats + rows :] > 0.5 if t.selected else torch.ones(rows, dtype=torch.bool)
            )
    all_losses = torch.cat(losses)
    _checked_sum(all_losses.numpy(), stage)
    return FeedbackGroup(
        torch.cat(candidates),
        torch.cat(kept) if selected else None,
        all_losses,
        len(transits),
        last=functools.partial(transits[-1].feedback, stage),
    )


class Delivery:
    """Mixin of :class:`~adaptive_batch.StepFeedback`: the measured batches in transit
    (``_transit``), and when and how they are reported to the sampler."""

    sampler: Any
    report_lag: int | None
    _transit: deque[InTransit]
    _assembler: Any
    _pass_ended: bool
    _training_thread: int | None
    _last: Feedback | FeedbackGroup | None

    def _deliver_due(self) -> None:
        """Report what is due: all but the lag's batches, once a group is full when grouping."""
        lag = self._lag()
        waiting = len(self._transit)
        if waiting > lag and (waiting >= lag + GROUP_BATCHES or not self._grouping()):
            self._deliver(lag)

    def _grouping(self) -> bool:
        """Whether feedback goes to the sampler a group of batches at a time."""
        return (
            self._assembler is None
            and not self._pass_ended
            and not getattr(self.sampler, "reads_each_feedback", True)
        )

    @property
    def last_feedback(self) -> Feedback | None:
        """The feedback of the latest batch reported to the sampler (``None`` before any)."""
        if isinstance(self._last, FeedbackGroup):
            self._last = self._last.last()
        return self._last

    def report_held(self) -> None:
        """Report what waits only to fill a group (the sampler asks when its table is read):
        from the training thread; the lag for the device copies still holds."""
        if threading.get_ident() == self._training_thread:
            self._deliver(self._lag())

    def _lag(self) -> int:
        if self.report_lag is not None:
            return self.report_lag
        newest = self._transit[-1] if self._transit else None
        return 1 if newest is not None and newest.on_accelerator else 0

    def _deliver(self, keep: int) -> None:
        """Report the oldest measured batches to the sampler until ``keep`` remain in transit:
        as one group when nothing reads each batch's feedback, else one by one."""
        count = len(self._transit) - keep
        if count <= 0:
            return
        batches = [self._transit.popleft() for _ in range(count)]
        if (
            count > 1
            and not getattr(self.sampler, "reads_each_feedback", True)
            and all(measured.copy is not None for measured in batches)
        ):
            group = group_of(batches, self)
            self.sampler.feedback_group(group)
            self._last = group
            return
        for measured in batches:
            feedback = measured.feedback(self)
            self.sampler.feedback(feedback)
            self._last = feedback
