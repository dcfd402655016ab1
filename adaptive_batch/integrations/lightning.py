"""AdaptiveBatchCallback: adaptive batches under Lightning's ``Trainer``.

Return the stage from ``train_dataloader()``, built with ``fetched_ahead=True``, and add the
callback::

    class Classifier(lightning.LightningModule):
        def train_dataloader(self):
            sampler = AdaptiveBatchSampler(self.data, policy=InfoBatch(num_epochs=10), batch_size=32)
            loader = DataLoader(IndexedDataset(self.data), batch_sampler=sampler)
            return StepFeedback(loader, self, sampler=sampler, fetched_ahead=True)

    trainer = lightning.Trainer(max_epochs=10, callbacks=[AdaptiveBatchCallback()])

Why each piece:

* Build the sampler in ``train_dataloader()``: under DDP the process group exists by then, so the
  sampler shards the index set by rank and its ranks agree on every batch size. Lightning leaves
  an iterable that is not a ``DataLoader`` as it is (no ``DistributedSampler`` is injected, so
  ``use_distributed_sampler`` does not matter).
* ``fetched_ahead=True``: the ``Trainer`` fetches one batch ahead of the step that trains it (to
  know which batch is last). The callback tells the stage when each step begins and ends, so the
  training forward is matched with its own batch, and feedback reaches the sampler in step order.
* Checkpoints: Lightning saves and restores an iterable with ``state_dict``/``load_state_dict``
  as part of its loop state; a stage built with ``fetched_ahead=True`` puts the sampler's state in
  its own, hands back the batch fetched ahead, and (look-ahead stage) keeps its selection. A run
  resumed with ``trainer.fit(model, ckpt_path=...)`` continues with the same batches, on every
  rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..contract import Stage, plan_rule_of
from ..errors import AdaptiveBatchError
from ..optional import require

__all__ = ["AdaptiveBatchCallback", "find_stages"]

_callbacks = require("lightning.pytorch.callbacks", "lightning", "the Lightning integration")


def find_stages(iterables: Any) -> list[Any]:
    """The adaptive stages (:class:`~adaptive_batch.contract.Stage`) among a train dataloader as
    Lightning holds it: one iterable, or a list, tuple or dict of them."""
    if isinstance(iterables, Mapping):
        return [s for value in iterables.values() for s in find_stages(value)]
    if isinstance(iterables, (list, tuple)):
        return [s for value in iterables for s in find_stages(value)]
    return [iterables] if isinstance(iterables, Stage) else []


class AdaptiveBatchCallback(_callbacks.Callback):
    """Announces each training step to the adaptive stages of the train dataloader.

    Before ``training_step`` it calls each stage's ``begin_batch()`` (a look-ahead filter reports
    the batch's feedback; :class:`~adaptive_batch.StepFeedback` starts matching the head's forward
    to it), after the optimizer step ``end_batch()`` (StepFeedback reports). An epoch plan built
    without the run's length (``InfoBatch()``, ``StaleSelectiveBackprop()``) gets the trainer's
    ``max_epochs`` as its ``num_epochs``, so it anneals where the run ends. Raises
    :class:`~adaptive_batch.AdaptiveBatchError` at the start of training when the train dataloader
    holds no stage, or one not built with ``fetched_ahead=True``.
    """

    def __init__(self) -> None:
        self.stages: list[Any] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.stages = find_stages(trainer.train_dataloader)
        if not self.stages:
            raise AdaptiveBatchError(
                "AdaptiveBatchCallback found no StepFeedback or SubsetFilter in the train "
                "dataloader: return the stage from train_dataloader(), e.g. "
                "StepFeedback(loader, self, sampler=sampler, fetched_ahead=True)"
            )
        for stage in self.stages:
            if not getattr(stage, "fetched_ahead", False):
                raise AdaptiveBatchError(
                    f"the {type(stage).__name__} in the train dataloader was built without "
                    "fetched_ahead=True: Lightning fetches a batch ahead of the step that trains "
                    "it, so build it with fetched_ahead=True"
                )
            plan = plan_rule_of(stage.sampler.policy)
            max_epochs = getattr(trainer, "max_epochs", None) or -1  # -1: no limit
            if plan is not None and getattr(plan, "num_epochs", 0) is None and max_epochs > 0:
                plan.num_epochs = max_epochs  # where the run's length is known

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        for stage in self.stages:
            stage.begin_batch()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for stage in self.stages:
            stage.end_batch()
