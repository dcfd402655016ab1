"""What StepFeedback holds of a batch: the batch being trained (what its forwards showed), and
the measured batches on their way to the sampler."""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..contract import Feedback, Reason
from ..errors import AdaptiveBatchError, AdaptiveBatchWarning
from ..probe import HeadLoss, HostCopy, check_model_output, gradient_moments, to_device
from .weighted_loss import YieldedRows

__all__ = [
    "STAT_NAMES",
    "InTransit",
    "MeasureWarnings",
    "PendingBatch",
    "check_head_output",
    "losses_of",
    "measure_statistics",
    "tensors_in",
    "weak_hook",
    "why_unmeasured",
]


@dataclass(kw_only=True)
class PendingBatch(YieldedRows):
    """The batch last yielded (its rows and plan weights), and what the training forward showed
    of it."""

    targets: Any
    features: list[Tensor] = field(default_factory=list)  # when statistics are wanted
    outputs: list[Tensor] = field(default_factory=list)
    part_losses: list[Tensor] = field(default_factory=list)  # else: losses, computed at once
    captured: int = 0
    losses: Tensor | None = None  # reported directly (report_losses)
    thread: int = field(default_factory=threading.get_ident)  # the thread that trains it
    skipped: str = ""  # why a forward of the head did not count (the warning says it)
    last_output: Tensor | None = None  # the head's output (detached), for the one output check
    kept_parts: list[Tensor] = field(default_factory=list)  # an in-batch rule's masks, in order
    kept_rows: int = 0

    def kept_mask(self) -> Tensor | None:
        """The in-batch rule's mask over the whole batch (``None``: no rule chose, or its
        choices do not cover the batch)."""
        if not self.kept_parts:
            return None
        mask = self.kept_parts[0] if len(self.kept_parts) == 1 else torch.cat(self.kept_parts)
        return mask if mask.numel() == self.rows else None


STAT_NAMES = ("loss", "grad_sq_norm", "grad_variance")


class _Warns(Protocol):
    def warn_nonfinite(self, bad: int, rows: int) -> None: ...


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
        empty = self.indices[:0]
        if self.copy is None:
            return Feedback(self.indices, empty, Reason.UNMEASURED, {"loss": math.nan})
        host = self.copy.result()
        rows = self.indices.numel()
        losses = host[self.stats : self.stats + rows]
        values = losses.numpy()
        finite = np.isfinite(values)
        if not finite.all():
            stage.warn_nonfinite(int((~finite).sum()), values.size)
        if self.stats:
            stats = dict(zip(STAT_NAMES, host[: self.stats].tolist(), strict=True))
        else:
            mean = (
                float(np.add.reduce(values, dtype=np.float64)) / values.size
                if values.size
                else math.nan
            )
            stats = {"loss": mean}
        if self.selected:  # an in-batch rule chose: the kept, then the dropped
            kept = host[self.stats + rows :] > 0.5
            stats["kept_fraction"] = float(kept.float().mean())
            order = torch.cat([losses[kept], losses[~kept]])
            return Feedback(self.indices[kept], self.indices[~kept], Reason.SELECTED, stats, order)
        reason = Reason.KEEP_ALL if math.isfinite(stats["loss"]) else Reason.NONFINITE
        return Feedback(self.indices, empty, reason, stats, losses=losses)


def tensors_in(output: Any) -> list[Tensor]:
    """The tensors a model returned: itself, or those in a tuple, list, dict or ModelOutput."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        return [v for v in output.values() if isinstance(v, Tensor)]
    if isinstance(output, (tuple, list)):
        return [v for v in output if isinstance(v, Tensor)]
    return []


def why_unmeasured(pending: PendingBatch, head: nn.Module | None) -> tuple[str, str]:
    """Why a batch's forward was not measured: a key (each is said once) and the words."""
    if pending.skipped == "eval":
        return "eval", (
            "the head ran in eval mode (model.eval()): call model.train() before the training "
            "forward; StepFeedback measures training forwards only"
        )
    if pending.skipped == "no_grad":
        return "no_grad", (
            "the head ran with gradients disabled (torch.no_grad() or inference_mode): the "
            "training forward must run with gradients"
        )
    if pending.captured:
        return "partial", (
            f"the training forwards covered {pending.captured} of the batch's {pending.rows} "
            "rows: every row must go through the model (micro-batches are joined in order)"
        )
    if head is not None:
        return "never", (
            f"the head {type(head).__name__} never ran. Is head= the module your model uses? If "
            "the model is torch.compile'd (hooks inlined away) or the loss is computed "
            "elsewhere, call batches.report_losses(per_sample_losses) after the forward; a "
            "skipped step needs nothing"
        )
    return "no_model", (
        "StepFeedback has no model, so it reports only what batches.report_losses(...) gives "
        "it, and this batch got none"
    )


def losses_of(loss: HeadLoss, outputs: Tensor, targets: Any) -> Tensor:
    """Per-sample losses of one forward's (detached) head outputs, in float32 at least, on the
    outputs' device: no graph is built and nothing waits for the device."""
    targets = to_device(targets, outputs.device)
    if outputs.dtype != torch.float32 and outputs.dtype != torch.float64:
        outputs = outputs.float()  # losses in float32 from half-precision logits
    if torch.is_autocast_enabled(outputs.device.type):
        with torch.autocast(outputs.device.type, enabled=False):
            return loss.losses(outputs, targets)
    return loss.losses(outputs, targets)


def measure_statistics(pending: PendingBatch, head: nn.Module, loss: HeadLoss) -> Tensor:
    """The batch's statistics then per-sample losses, packed into one tensor for one transfer:
    the head-gradient moments in closed form, ``O(B (C + D))``."""
    features, outputs = torch.cat(pending.features), torch.cat(pending.outputs)
    dtype = torch.promote_types(features.dtype, torch.float32)
    targets = to_device(pending.targets, outputs.device)
    with torch.no_grad(), torch.autocast(outputs.device.type, enabled=False):
        features, outputs = features.to(dtype), outputs.to(dtype)
        losses = loss.losses(outputs, targets)
        moments = gradient_moments(head, features, lambda: loss.gradients(outputs, targets))
        if moments is None:
            nan = losses.new_full((), math.nan)
            stats = torch.stack([losses.mean(), nan, nan])
        else:
            sq_norms, mean_sq = moments
            stats = torch.stack([losses.mean(), mean_sq, (sq_norms.mean() - mean_sq).clamp_min(0)])
        return torch.cat([stats.to(losses.dtype), losses.detach()])


def check_head_output(output: Any, head_output: Tensor, head: nn.Module | None) -> None:
    """Refuse a model whose output (or no tensor in it) is not its head's output."""
    for candidate in tensors_in(output):
        try:
            check_model_output(candidate, head_output, head)  # type: ignore[arg-type]
            return
        except AdaptiveBatchError:
            continue
    raise AdaptiveBatchError(
        f"StepFeedback measures the output of {type(head).__name__} (the model's last nn.Linear "
        "unless head= says otherwise), but the model returns something else (a layer after the "
        "head, or a head written as a function): the losses it would report are not your loss. "
        "Pass head=<the module whose output the model returns> (a module or its name in "
        "model.named_modules()), or report the losses yourself with StepFeedback(loader, None, "
        "sampler=sampler) and batches.report_losses(losses)."
    )


def weak_hook(stage: object, name: str) -> Any:
    """A forward hook calling ``stage.<name>`` that holds the stage weakly (dropping the stage
    leaves a no-op, and no reference cycle keeps a loader alive)."""
    method_ref = weakref.WeakMethod(getattr(stage, name))

    @torch.compiler.disable  # host-side bookkeeping: a compiled model runs it eagerly
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        method = method_ref()
        if method is not None:
            method(module, args, output)

    return hook


class MeasureWarnings:
    """Mixin of :class:`~adaptive_batch.StepFeedback`: measuring a batch it yielded, and each
    reason a batch went unmeasured (or unselected), and non-finite losses, said once."""

    head: nn.Module | None
    loss: HeadLoss
    in_batch: Any
    num_unmeasured: int
    _warned: set[str]

    def _measure(self, pending: PendingBatch) -> InTransit:
        stats = 0
        if pending.losses is not None:
            packed = pending.losses
        elif pending.captured != pending.rows or self.head is None:
            self.num_unmeasured += 1
            self._warn_unmeasured(pending)
            return InTransit(pending.indices, None, 0)
        elif pending.part_losses:
            parts = pending.part_losses
            packed = parts[0] if len(parts) == 1 else torch.cat(parts)
        else:
            assert self.head is not None
            packed, stats = measure_statistics(pending, self.head, self.loss), len(STAT_NAMES)
        kept = pending.kept_mask()
        if self.in_batch is not None and kept is None:
            self._warn_unweighted()
        self._check_plan_weights_used(pending)
        return InTransit.of(pending.indices, packed, stats, kept)

    def _warn_unmeasured(self, pending: PendingBatch) -> None:
        key, why = why_unmeasured(pending, self.head)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"StepFeedback could not measure a batch, so its feedback carries no loss: {why}.",
                AdaptiveBatchWarning,
                stacklevel=4,
            )

    def _warn_unweighted(self) -> None:
        if "unweighted" not in self._warned:
            self._warned.add("unweighted")
            warnings.warn(
                "the policy has an in-batch rule, but this batch's loss did not go through "
                "batches.weighted(...), so the step trained on every sample and the rule chose "
                "nothing. Compute the loss with loss_fn = batches.weighted(<per-sample loss, "
                "reduction='none'>) over the whole batch.",
                AdaptiveBatchWarning,
                stacklevel=4,
            )

    def _check_plan_weights_used(self, pending: PendingBatch) -> None:
        """Until the first batch whose epoch plan weighs it: say once if those weights never
        reached the loss (the loss did not go through ``batches.weighted``)."""
        if "plan_weights" in self._warned:
            return
        weights = pending.weights
        if weights is None and pending.weight_offset == 0:
            weights = self.sampler.weights_of(pending.indices)  # O(batch), until the first
        if weights is None:
            return
        self._warned.add("plan_weights")  # checked once: used, or said now
        if pending.weight_offset == 0:
            warnings.warn(
                f"the epoch plan ({type(self.sampler.policy).__name__}) weighs the samples of "
                "this batch, but its loss did not go through batches.weighted(...), so the "
                "weights never reached it (InfoBatch's rescaling is lost). Compute the loss with "
                "loss_fn = batches.weighted(<per-sample loss, reduction='none'>).",
                AdaptiveBatchWarning,
                stacklevel=4,
            )

    def warn_nonfinite(self, bad: int, rows: int) -> None:
        """Say once that a batch had NaN or infinite per-sample losses."""
        if "nonfinite" not in self._warned:
            self._warned.add("nonfinite")
            warnings.warn(
                f"{bad} of the {rows} per-sample losses of a batch were NaN or infinite: those "
                "samples get no score (an epoch plan cannot rank them, a sizing rule skips the "
                "batch). Check the inputs and targets for NaNs, the learning rate, or a loss "
                "scaler.",
                AdaptiveBatchWarning,
                stacklevel=5,
            )
