"""StepFeedback: feedback from the training step's own forward pass, at no extra forward."""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..contract import (
    Feedback,
    FeedbackSink,
    Reason,
    check_feedback_sink,
    check_feedback_source,
    check_fetched_ahead,
    load_trainer_state,
    require_keys,
    sizing_rule_of,
    trainer_state,
)
from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError, AdaptiveBatchWarning
from ..load import ChunkAssembler, check_not_resharded, get_field, split_indexed
from ..probe import HeadLoss, LossFn, find_head, gradient_moments, resolve_loss
from .weighted_loss import WeightedLoss

__all__ = ["StepFeedback"]


@dataclass
class _Pending:
    """The batch last yielded, and what the training forward showed of it."""

    indices: Tensor
    targets: Any
    rows: int
    features: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    captured: int = 0
    losses: Tensor | None = None  # reported directly (report_losses)
    thread: int = field(default_factory=threading.get_ident)  # the thread that trains it
    weights: Tensor | None = None
    weight_offset: int = 0


class StepFeedback:
    """Yields the loader's batches unchanged and reports each one's feedback from your own
    training forward: no extra forward pass.

    A forward hook on the model's head captures the head's inputs and outputs during the training
    forward of the batch just yielded; when the loop asks for the next batch (or the epoch ends)
    they become, with the batch's targets and dataset indices, per-sample losses and head-gradient
    statistics -- in closed form, ``O(B (C + D))``, no ``B x C x D`` tensor -- and one
    :class:`~adaptive_batch.Feedback` to the sampler. Sizing rules (CABS with head variance, the
    gradient noise scale, AdaDamp, PadaDamp, GeoDamp, Arbiter) then adapt at no extra cost, and
    epoch plans (InfoBatch, small-loss, stale Selective-Backprop) score every sample from it.

    Only forwards of the head in training mode with gradients enabled count, and only as many
    rows as the batch has: an evaluation forward inside the loop (``model.eval()`` or
    ``torch.no_grad()``) is ignored, several forwards over parts of the batch (micro-batches of
    gradient accumulation) are joined, a second forward over the same batch (SAM) is ignored.
    Several yielded batches per optimizer step are several batches, each reported. A batch whose
    forward was not seen (a ``torch.compile``'d model that inlines away hooks, a step skipped) is
    reported as :attr:`~adaptive_batch.Reason.UNMEASURED`, with a warning: call
    :meth:`report_losses` yourself then.

    Args:
        batches: the source of batches (a DataLoader over an ``IndexedDataset``, or anything
            wrapping one), iterated anew by each ``iter()``.
        model: the model being trained (DDP-wrapped or not); ``None`` when you report losses
            yourself with :meth:`report_losses`.
        sampler: the :class:`~adaptive_batch.AdaptiveBatchSampler` to report to. With a chunked
            sampler, batches are assembled from its chunks.
        head: the head module or its name; default: the last ``nn.Linear`` in ``model``. The
            model's loss must be computed on its output.
        loss: ``"cross_entropy"``, ``"mse"``, or ``loss_fn(outputs, targets) -> [B]``: the
            per-sample loss the feedback reports (computed on the captured head outputs).
        targets: where the targets are in each batch (a position or a key).
        fetched_ahead: the trainer fetches batches ahead of their training steps and announces
            each step: :meth:`begin_batch` before it, :meth:`end_batch` after it (Lightning's
            ``Trainer`` fetches one batch ahead; :class:`~adaptive_batch.integrations.lightning.
            AdaptiveBatchCallback` makes the calls). Batches are matched to steps in order. The
            trainer then checkpoints only this stage, so :meth:`state_dict` holds the sampler's
            state too, and batches fetched but not yet trained are handed back to it: a resumed
            run fetches them again.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from adaptive_batch import AdaptiveBatchSampler, IndexedDataset
        >>> from adaptive_batch.policies import GradientNoiseScale
        >>> ds = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sampler = AdaptiveBatchSampler(ds, policy=GradientNoiseScale(), batch_size=16)
        >>> batches = StepFeedback(DataLoader(IndexedDataset(ds), batch_sampler=sampler), model, sampler=sampler)
        >>> for x, y in batches:  # the loop body is the usual one
        ...     optimizer.zero_grad()
        ...     nn.functional.cross_entropy(model(x), y).backward()
        ...     optimizer.step()
        >>> batches.num_candidates, batches.num_unmeasured, sampler.num_feedback == batches.num_batches
        (64, 0, True)
    """

    CANDIDATES_KEY, BATCHES_KEY, UNMEASURED_KEY, SAMPLER_KEY = (
        "num_candidates",
        "num_batches",
        "num_unmeasured",
        "sampler",
    )

    def __init__(
        self,
        batches: Iterable[Any] | None,
        model: nn.Module | None = None,
        *,
        sampler: FeedbackSink,
        head: nn.Module | str | None = None,
        loss: str | LossFn | HeadLoss = "cross_entropy",
        targets: int | str = 1,
        fetched_ahead: bool = False,
    ) -> None:
        check_feedback_sink(sampler)
        check_feedback_source(sizing_rule_of(sampler.policy), "training_step")
        check_not_resharded(batches, sampler)
        self.batches = batches
        self.sampler = sampler
        self.loss = resolve_loss(loss)
        self.targets = targets
        self.head: nn.Module | None = None
        self._hook = None
        if model is not None:
            if isinstance(head, str):
                head = model.get_submodule(head)
            self.head = find_head(model) if head is None else head
            self._hook = self.head.register_forward_hook(_weak_hook(self))
            # The hook holds the stage weakly: dropping the stage removes it, and no reference
            # cycle keeps a loader (and its workers) alive until the garbage collector runs.
            weakref.finalize(self, self._hook.remove)
        elif head is not None:
            raise AdaptiveBatchError("head= needs the model it belongs to")
        sampler.register_reporter(self)
        self.num_candidates = self.num_batches = self.num_unmeasured = 0
        self.last_feedback: Feedback | None = None
        self._pending: _Pending | None = None
        self.fetched_ahead = fetched_ahead
        if fetched_ahead:
            check_fetched_ahead(sampler)
        self._ahead: deque[_Pending] = deque()  # fetched, their steps not begun (fetched_ahead)
        self._assembler = ChunkAssembler(sampler) if sampler.chunk_size is not None else None  # type: ignore[arg-type]

    # -- the stream -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        if self.batches is None:
            raise AdaptiveBatchTypeError(
                "this StepFeedback has no source of batches; use hand_out(batch)"
            )
        source = iter(self.batches)
        self._ahead.clear()
        if self._assembler is not None:
            self._assembler.reset()
        while (batch := self.next_from(source)) is not None:
            yield batch

    def next_from(self, source: Iterator[Any]) -> Any:
        """The next batch of ``source`` (``None`` at its end), after reporting the last one's
        feedback: what ``iter()`` does, for a pipeline that drives the stage itself."""
        if not self.fetched_ahead:
            self.settle()
        if self._assembler is not None:
            batch = self._assembler.next_batch(source)
        else:
            batch = next(source, None)
        return None if batch is None else self.hand_out(batch)

    def hand_out(self, batch: Any) -> Any:
        """Record ``batch`` as the one being trained (with ``fetched_ahead``: the next to be
        trained) and return it without its indices."""
        indices, batch = split_indexed(batch, required=True)
        assert indices is not None
        pending = _Pending(indices, get_field(batch, self.targets), indices.numel())
        if self.fetched_ahead:
            self._ahead.append(pending)
        else:
            self.settle()
            self._pending = pending
        return batch

    def begin_batch(self) -> None:
        """The trainer starts the step of the oldest batch fetched (``fetched_ahead``)."""
        self.settle()
        if self._ahead:
            self._pending = self._ahead.popleft()
            self._pending.thread = threading.get_ident()

    def end_batch(self) -> None:
        """The trainer finished the step begun last: its feedback goes to the sampler."""
        self.settle()

    @property
    def current_indices(self) -> Tensor | None:
        """The dataset indices of the batch just yielded (``None`` before the first)."""
        return None if self._pending is None else self._pending.indices

    def __len__(self) -> int:
        if self._assembler is not None:
            raise AdaptiveBatchTypeError(
                "batches assembled from chunks have no length known in advance"
            )
        return len(self.batches)  # type: ignore[arg-type]

    # -- what the training step shows ------------------------------------------------------------

    def _capture(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        pending = self._pending
        if pending is None or not module.training or not torch.is_grad_enabled() or not args:
            return  # no batch in training, or an evaluation forward
        if threading.get_ident() != pending.thread:
            raise AdaptiveBatchError(
                "the batch StepFeedback handed out last was handed out in another thread than "
                "the one training: nothing may prefetch after the stage (put a Prefetcher before "
                "StepFeedbackNode, never after it)"
            )
        features = args[0]
        if not (isinstance(features, Tensor) and isinstance(output, Tensor)):
            return
        if pending.captured + features.shape[0] > pending.rows:
            return  # more rows than the batch has: another forward of the same batch
        pending.features.append(features.detach().clone())
        pending.outputs.append(output.detach().clone())
        pending.captured += features.shape[0]

    def report_losses(self, losses: Tensor) -> None:
        """Report the per-sample losses of the batch just yielded yourself (``[B]``, in batch
        order): for a model without a hookable head, or a loss computed elsewhere."""
        if self._pending is None:
            raise AdaptiveBatchError("report_losses() reports the batch just yielded; none is")
        if losses.shape != (self._pending.rows,):
            raise AdaptiveBatchError(
                f"report_losses() needs {self._pending.rows} per-sample losses; got {tuple(losses.shape)}"
            )
        self._pending.losses = losses.detach()

    def settle(self) -> None:
        """Report the feedback of the batch just yielded, if it is still pending."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        feedback = self._measure(pending)
        self.sampler.feedback(feedback)
        self.last_feedback = feedback
        self.num_candidates += feedback.batch_size
        self.num_batches += 1

    def _measure(self, pending: _Pending) -> Feedback:
        empty = pending.indices[:0]
        if pending.losses is not None:
            losses = pending.losses.to("cpu", torch.float32)
            stats = {"loss": float(losses.mean())}
            return Feedback(pending.indices, empty, Reason.KEEP_ALL, stats, losses=losses)
        if pending.captured != pending.rows or self.head is None:
            self.num_unmeasured += 1
            if self.num_unmeasured == 1:
                warnings.warn(
                    f"StepFeedback saw no training forward of the head for a batch ({pending.captured} "
                    f"of {pending.rows} rows): its feedback carries no loss. If the model is "
                    "torch.compile'd (hooks inlined away) or the loss is computed elsewhere, call "
                    "batches.report_losses(per_sample_losses) after the forward; a skipped step "
                    "needs nothing.",
                    AdaptiveBatchWarning,
                    stacklevel=3,
                )
            return Feedback(pending.indices, empty, Reason.UNMEASURED, {"loss": math.nan})
        return self._statistics(pending, empty)

    def _statistics(self, pending: _Pending, empty: Tensor) -> Feedback:
        features, outputs = torch.cat(pending.features), torch.cat(pending.outputs)
        dtype = torch.promote_types(features.dtype, torch.float32)
        targets = pending.targets
        if isinstance(targets, Tensor):
            targets = targets.to(outputs.device, non_blocking=True)
        with torch.no_grad(), torch.autocast(outputs.device.type, enabled=False):
            features, outputs = features.to(dtype), outputs.to(dtype)
            losses = self.loss.losses(outputs, targets)
            assert self.head is not None
            moments = gradient_moments(
                self.head, features, lambda: self.loss.gradients(outputs, targets)
            )
            if moments is None:
                nan = losses.new_full((), math.nan)
                stats = torch.stack([losses.mean(), nan, nan])
            else:
                sq_norms, mean_sq = moments
                stats = torch.stack(
                    [losses.mean(), mean_sq, (sq_norms.mean() - mean_sq).clamp_min(0)]
                )
            host = torch.cat([stats, losses.detach()]).to("cpu", torch.float32)  # one transfer
        names = ("loss", "grad_sq_norm", "grad_variance")
        stats_dict = dict(zip(names, host[:3].tolist(), strict=True))
        reason = Reason.KEEP_ALL if math.isfinite(stats_dict["loss"]) else Reason.NONFINITE
        return Feedback(pending.indices, empty, reason, stats_dict, losses=host[3:])

    # -- weights of epoch plans ------------------------------------------------------------------

    def batch_weights(self) -> Tensor | None:
        """The epoch plan's training weights of the batch just yielded (``None``: all 1)."""
        pending = self._pending
        if pending is None:
            return None
        if pending.weights is None:
            pending.weights = self.sampler.weights_of(pending.indices)  # type: ignore[attr-defined]
        return pending.weights

    def weighted(self, loss_fn: LossFn) -> WeightedLoss:
        """``loss_fn`` (per-sample: ``reduction="none"``) weighted by the epoch plan, averaged:
        create it once and call it as your loss; the loop body does not change."""
        return WeightedLoss(loss_fn, self)

    def _next_weights(self, rows: int, device: torch.device) -> Tensor | None:
        weights = self.batch_weights()
        pending = self._pending
        if weights is None or pending is None:
            return None
        start = pending.weight_offset if pending.weight_offset + rows <= pending.rows else 0
        pending.weight_offset = start + rows
        return weights[start : start + rows].to(device, non_blocking=True)

    # -- checkpointing ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Report the batch just yielded if its training forward (or its losses) came already:
        the sampler calls it before a checkpoint, so the checkpoint includes that batch. Only
        the training thread reports (a loader's prefetching thread asking for a checkpoint of
        the sampler leaves the batch to it)."""
        pending = self._pending
        if pending is None or threading.get_ident() != pending.thread:
            return
        if pending.captured or pending.losses is not None:
            self.settle()

    def state_dict(self) -> dict[str, Any]:
        """The counters; with a chunked sampler also its feedback side. A batch already trained
        is reported first, so nothing of it is lost."""
        self.flush()
        state: dict[str, Any] = {
            self.CANDIDATES_KEY: self.num_candidates,
            self.BATCHES_KEY: self.num_batches,
            self.UNMEASURED_KEY: self.num_unmeasured,
        }
        if self._assembler is not None:
            state[self.SAMPLER_KEY] = self.sampler.feedback_state_dict()
        if self.fetched_ahead:  # the trainer saves this stage alone: the sampler's state too
            return trainer_state(self.sampler, state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.fetched_ahead:
            state = load_trainer_state(self.sampler, state)
        require_keys(self, state, (self.CANDIDATES_KEY, self.BATCHES_KEY))
        self._ahead.clear()
        if self._assembler is not None:
            self.sampler.load_feedback_state_dict(state[self.SAMPLER_KEY])
        self._pending = None
        self.num_candidates = state[self.CANDIDATES_KEY]
        self.num_batches = state[self.BATCHES_KEY]
        self.num_unmeasured = state.get(self.UNMEASURED_KEY, 0)

    def close(self) -> None:
        """Report what is pending and remove the hook from the head."""
        self.settle()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _weak_hook(stage: StepFeedback) -> Any:
    capture = weakref.WeakMethod(stage._capture)

    @torch.compiler.disable  # host-side bookkeeping: a compiled model runs it eagerly
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        method = capture()
        if method is not None:
            method(module, args, output)

    return hook
