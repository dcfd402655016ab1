"""What StepFeedback holds of a batch: the batch being trained (what its forwards showed), and
the measured batches on their way to the sampler."""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AdaptiveBatchError, AdaptiveBatchWarning
from ..probe import HeadLoss, check_model_output, gradient_moments, to_device
from .delivery import STAT_NAMES, InTransit
from .weighted_loss import YieldedRows

__all__ = [
    "STAT_NAMES",
    "BatchMeasurement",
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
    # or, when the weighted loss shares its losses: each forward's head output (dropped once
    # its losses came) and first row, to compute them from if they do not come
    head_outputs: list[tuple[Tensor | None, int]] = field(default_factory=list)
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
        mask = _joined(self.kept_parts)
        return mask if mask.numel() == self.rows else None


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


def _joined(parts: list[Tensor]) -> Tensor:
    """The forwards' parts as one tensor (the one part itself: no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _full_precision(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off, if it is on (entering ``torch.autocast`` costs tens of us)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def losses_of(loss: HeadLoss, outputs: Tensor, targets: Any) -> Tensor:
    """Per-sample losses of one forward's (detached) head outputs, in float32 at least, on the
    outputs' device: no graph is built and nothing waits for the device."""
    targets = to_device(targets, outputs.device)
    if outputs.dtype != torch.float32 and outputs.dtype != torch.float64:
        outputs = outputs.float()  # losses in float32 from half-precision logits
    with _full_precision(outputs.device.type):
        return loss.losses(outputs, targets)


def measure_statistics(pending: PendingBatch, head: nn.Module, loss: HeadLoss) -> Tensor:
    """The batch's statistics then per-sample losses, packed into one tensor for one transfer:
    the head-gradient moments in closed form, ``O(B (C + D))``."""
    features, outputs = _joined(pending.features), _joined(pending.outputs)
    dtype = torch.promote_types(features.dtype, torch.float32)
    targets = to_device(pending.targets, outputs.device)
    with torch.no_grad(), _full_precision(outputs.device.type):
        if features.dtype != dtype or outputs.dtype != dtype:
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


class BatchMeasurement:
    """Mixin of :class:`~adaptive_batch.StepFeedback`: what the forward hooks capture of the
    batch being trained, measuring it once its step is over, and each reason a batch went
    unmeasured (or unselected), and non-finite losses, said once."""

    head: nn.Module | None
    loss: HeadLoss
    shares_losses: bool
    in_batch: Any
    num_unmeasured: int
    wants_statistics: bool
    _warned: set[str]
    _pending: PendingBatch | None
    _output_checked: bool
    _hooks: list[Any]
    _head_output: tuple[int, Any] | None

    def _capture(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        pending = self._pending
        if pending is None or not args:
            return  # no batch in training
        if not module.training or not torch.is_grad_enabled():
            pending.skipped = "eval" if not module.training else "no_grad"
            return  # an evaluation forward
        if threading.get_ident() != pending.thread:
            raise AdaptiveBatchError(
                "the batch StepFeedback handed out last was handed out in another thread than "
                "the one training: nothing may prefetch after the stage (put a Prefetcher before "
                "StepFeedbackNode, never after it)"
            )
        features = args[0]
        if not (isinstance(features, Tensor) and isinstance(output, Tensor)):
            return
        rows = features.shape[0]
        start = pending.captured
        if start + rows > pending.rows:
            return  # more rows than the batch has: another forward of the same batch
        if not self._output_checked:
            pending.last_output = output.detach()  # for the one check of the model's output
        targets = pending.targets
        if self.wants_statistics or not isinstance(targets, Tensor) or pending.rows != len(targets):
            pending.features.append(features.detach().clone())
            pending.outputs.append(output.detach().clone())
        elif self.shares_losses:  # the weighted loss computes them: keep the output till then
            pending.head_outputs.append((output.detach(), start))
        else:  # an epoch plan reads losses only: compute them now, keep nothing else
            part = targets if rows == pending.rows else targets[start : start + rows]
            pending.part_losses.append(losses_of(self.loss, output.detach(), part))
            self._head_output = (output.data_ptr(), output.shape)
        pending.captured += rows

    def own_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The stage's per-sample loss of ``outputs`` (for ``weighted()``), with its graph; when
        ``outputs`` is the head output the hook saw, these values are the batch's feedback too,
        and the hook stops computing its own from the next batch on."""
        losses = losses_of(self.loss, outputs, targets)
        pending = self._pending
        if pending is None:
            return losses
        done = len(pending.part_losses)
        if pending.head_outputs and done < len(pending.head_outputs):
            output, start = pending.head_outputs[done]
            if output is not None and _same_tensor(output, outputs):
                pending.part_losses.append(losses.detach())
                pending.head_outputs[done] = (None, start)  # its memory is not held any longer
        elif self._head_output == (outputs.data_ptr(), outputs.shape):
            self.shares_losses = True
        return losses

    def _check_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """The model's output must be its head's (or a view of it): checked once, on the first
        training forward the head took part in."""
        pending = self._pending
        if self._output_checked or pending is None or pending.last_output is None:
            return
        if not module.training or not torch.is_grad_enabled():
            return
        self._output_checked = True
        head_output, pending.last_output = pending.last_output, None
        if len(self._hooks) > 1:
            self._hooks.pop().remove()
        check_head_output(output, head_output, self.head)

    def _measure(self, pending: PendingBatch) -> InTransit:
        stats = 0
        if pending.losses is not None:
            packed = pending.losses
        elif pending.captured != pending.rows or self.head is None:
            self.num_unmeasured += 1
            self._warn_unmeasured(pending)
            return InTransit(pending.indices, None, 0)
        elif pending.head_outputs:  # deferred to the weighted loss
            packed = self._deferred_losses(pending)
        elif pending.part_losses:
            parts = pending.part_losses
            packed = _joined(parts)
        else:
            assert self.head is not None
            packed, stats = measure_statistics(pending, self.head, self.loss), len(STAT_NAMES)
        kept = pending.kept_mask()
        if self.in_batch is not None and kept is None:
            self._warn_unweighted()
        self._check_plan_weights_used(pending)
        return InTransit.of(pending.indices, packed, stats, kept)

    def _deferred_losses(self, pending: PendingBatch) -> Tensor:
        """The losses the weighted loss shared, and those of the forwards it did not see
        (computed now from their head outputs; sharing stops until it shares again)."""
        parts = list(pending.part_losses)
        missing = pending.head_outputs[len(parts) :]
        if missing:
            self.shares_losses = False
            targets = pending.targets
            for output, start in missing:
                assert output is not None
                rows = output.shape[0]
                part = targets if rows == pending.rows else targets[start : start + rows]
                parts.append(losses_of(self.loss, output, part))
        return _joined(parts)

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


def _same_tensor(captured: Tensor, given: Tensor) -> bool:
    """Whether ``given`` is the tensor the hook captured (detached: the same memory)."""
    return captured.data_ptr() == given.data_ptr() and captured.shape == given.shape
