"""StepFeedback: feedback from the training step's own forward pass, at no extra forward."""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn

from ..contract import (
    Feedback,
    FeedbackGroup,
    FeedbackSink,
    check_feedback_sink,
    check_fetched_ahead,
    check_policy_for_stage,
    in_batch_rule_of,
    load_trainer_state,
    require_keys,
    trainer_state,
)
from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError
from ..load import ChunkAssembler, check_not_resharded, get_field, split_indexed
from ..probe import (
    HeadLoss,
    LossFn,
    find_head,
    resolve_loss,
)
from .delivery import Delivery, InTransit
from .measured import (
    BatchMeasurement,
    PendingBatch,
    weak_hook,
)
from .weighted_loss import PlanWeights

__all__ = ["StepFeedback"]


class StepFeedback(BatchMeasurement, PlanWeights, Delivery):
    """Yields the loader's batches unchanged and reports each one's feedback from your own
    training forward: no extra forward pass.

    A forward hook on the model's head captures the head's inputs and outputs during the training
    forward of the batch just yielded; when the loop asks for the next batch (or the epoch ends)
    they become, with the batch's targets and dataset indices, per-sample losses and head-gradient
    statistics -- in closed form, ``O(B (C + D))``, no ``B x C x D`` tensor -- and one
    :class:`~adaptive_batch.Feedback` to the sampler. Sizing rules (CABS with head variance, the
    gradient noise scale, AdaDamp, PadaDamp, GeoDamp, Arbiter) then adapt at no extra cost, and
    epoch plans (InfoBatch, small-loss, stale Selective-Backprop) score every sample from it. An
    in-batch rule (``SmallLoss(stage="in_batch", fraction=...)``, Co-teaching's) picks the samples
    each step trains on through :meth:`weighted`; a look-ahead selection rule is refused (it needs
    a :class:`~adaptive_batch.SubsetFilter`).

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
        report_lag: batches a batch's feedback waits before it reaches the sampler, so that its
            device-to-host copy overlaps the next step instead of stalling the device. Default
            (``None``): 1 when the model runs on an accelerator, 0 on the CPU. Epoch plans are
            unaffected (an epoch's feedback is all in before the next epoch is planned); a sizing
            rule decides one batch later. Checkpoints and the end of an epoch wait for it all.

    Losses and statistics never leave the model's device inside a step: they are computed there
    (the statistics only when a sizing rule or a listener reads them: an epoch plan needs the
    per-sample losses alone) and copied to pinned host memory without blocking. When nothing
    reads feedback batch by batch (an epoch plan on one process: no sizing rule, no listener),
    a group of batches is reported at once (``sampler.feedback_group``); reading the sampler's
    table reports the held ones first. ``weighted()`` without a loss trains on this stage's
    ``loss`` and reports the same values: the per-sample loss is computed once per step.

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
        report_lag: int | None = None,
    ) -> None:
        check_feedback_sink(sampler)
        check_policy_for_stage(sampler.policy, "training_step")
        check_not_resharded(batches, sampler)
        if report_lag is not None and report_lag < 0:
            raise AdaptiveBatchError(f"report_lag must be 0 or more; got {report_lag}")
        self.batches = batches
        self.sampler = sampler
        self.loss = resolve_loss(loss)
        self.targets = targets
        self.report_lag = report_lag
        self.head: nn.Module | None = None
        self._hooks: list[Any] = []
        self._output_checked = False
        if model is not None:
            if isinstance(head, str):
                head = model.get_submodule(head)
            self.head = find_head(model) if head is None else head
            # The hooks hold the stage weakly: dropping the stage removes them, and no reference
            # cycle keeps a loader (and its workers) alive until the garbage collector runs.
            self._hooks.append(self.head.register_forward_hook(weak_hook(self, "_capture")))
            if self.head is not model:  # removed once it has checked (a hook costs every call)
                self._hooks.append(model.register_forward_hook(weak_hook(self, "_check_output")))
            for handle in self._hooks:
                weakref.finalize(self, handle.remove)
        elif head is not None:
            raise AdaptiveBatchError("head= needs the model it belongs to")
        sampler.register_reporter(self)
        self.in_batch = in_batch_rule_of(sampler.policy)
        self.num_candidates = self.num_batches = self.num_unmeasured = 0
        self._last: Feedback | FeedbackGroup | None = None  # a group's is built when read
        self._pass_ended = False  # the source is done: what is left reports at once
        self._training_thread: int | None = None
        self.shares_losses = False  # whether the weighted loss computes the feedback's losses
        self._head_output: tuple[int, Any] | None = None  # where the hook's last output lives
        self._pending: PendingBatch | None = None
        self._transit: deque[InTransit] = deque()  # measured, on their way to the host
        self._warned: set[str] = set()
        self.fetched_ahead = fetched_ahead
        if fetched_ahead:
            check_fetched_ahead(sampler)
        self._ahead: deque[PendingBatch] = deque()  # fetched, their steps not begun (fetched_ahead)
        self._assembler = ChunkAssembler(sampler) if sampler.chunk_size is not None else None  # type: ignore[arg-type]

    wants_statistics = property(
        lambda self: bool(getattr(self.sampler, "wants_gradient_statistics", True)),
        doc="Whether head-gradient statistics are computed (else per-sample losses only).",
    )

    # -- the stream -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        if self.batches is None:
            raise AdaptiveBatchTypeError(
                "this StepFeedback has no source of batches; use hand_out(batch)"
            )
        source = iter(self.batches)
        self.start_pass()
        while (batch := self.next_from(source)) is not None:
            yield batch

    def start_pass(self) -> None:
        """Forget batches fetched for an earlier pass and start assembling anew (what ``iter()``
        does; a node calls it on ``reset()``)."""
        self.settle()
        self._deliver(0)  # every report in before the sampler plans the next pass
        self._pass_ended = False
        self._ahead.clear()
        if self._assembler is not None:
            self._assembler.reset()

    def next_from(self, source: Iterator[Any]) -> Any:
        """The next batch of ``source`` (``None`` at its end), after reporting the last one's
        feedback: what ``iter()`` does, for a pipeline that drives the stage itself. At the end
        every report still on its way reaches the sampler, so the next epoch's plan sees them."""
        if not self.fetched_ahead:
            self.settle()
        if self._assembler is not None:
            batch = self._assembler.next_batch(source)
        else:
            batch = next(source, None)
        if batch is None:
            if not self.fetched_ahead:  # (a trainer's last step may not have run yet)
                self.settle()
            self._pass_ended = True  # (and a trainer's last steps report at once)
            self._deliver(0)
            return None
        return self.hand_out(batch)

    def hand_out(self, batch: Any) -> Any:
        """Record ``batch`` as the one being trained (with ``fetched_ahead``: the next to be
        trained) and return it without its indices."""
        indices, batch = split_indexed(batch, required=True)
        assert indices is not None
        pending = PendingBatch(indices, indices.numel(), targets=get_field(batch, self.targets))
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
    def num_held(self) -> int:
        """Batches taken from the loader whose feedback has not reached the sampler yet."""
        return (self._pending is not None) + len(self._transit) + len(self._ahead)

    def _yielded_rows(self) -> PendingBatch | None:
        return self._pending

    @property
    def trained_rows(self) -> int | None:
        """How many rows of the batch just yielded its step trains on: the in-batch rule's kept
        count once the weighted loss ran, else every row (``None`` before the first batch)."""
        pending = self._pending
        if pending is None:
            return None
        return pending.kept_rows if pending.kept_parts else pending.rows

    @property
    def current_indices(self) -> Tensor | None:
        """The dataset indices of the batch just yielded (``None`` before the first)."""
        return None if self._pending is None else self._pending.indices

    def __len__(self) -> int:
        if self._assembler is not None:
            raise AdaptiveBatchTypeError("batches assembled from chunks have no length in advance")
        return len(self.batches)  # type: ignore[arg-type]

    # -- what the training step shows ------------------------------------------------------------

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
        """Measure the batch just yielded, if it is still pending, and send it on its way to the
        sampler (it arrives ``report_lag`` batches later)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._transit.append(self._measure(pending))
            self.num_batches += 1
            self.num_candidates += pending.rows
            self._training_thread = pending.thread
        self._deliver_due()

    # -- checkpointing ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Report the batch just yielded if its training forward (or its losses) came already,
        and every report on its way: the sampler calls it before a checkpoint, so the
        checkpoint includes those batches. Only the training thread reports (a loader's
        prefetching thread asking for a checkpoint of the sampler leaves the batch to it)."""
        pending = self._pending
        if pending is not None and threading.get_ident() != pending.thread:
            return
        if pending is not None and (pending.captured or pending.losses is not None):
            self.settle()
        self._deliver(0)

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
        self._transit.clear()
        if self._assembler is not None:
            self.sampler.load_feedback_state_dict(state[self.SAMPLER_KEY])
        self._pending = None
        self.num_candidates = state[self.CANDIDATES_KEY]
        self.num_batches = state[self.BATCHES_KEY]
        self.num_unmeasured = state.get(self.UNMEASURED_KEY, 0)

    def close(self) -> None:
        """Report what is pending and remove the hooks."""
        self.settle()
        self._deliver(0)
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
