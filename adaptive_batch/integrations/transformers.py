"""AdaptiveBatchTrainer: a ``transformers.Trainer`` whose training batches come from an
:class:`~adaptive_batch.AdaptiveBatchSampler`, scored by the training step's own forward.

Use it where you use ``Trainer``, with the same model, arguments, data and collator, plus a
policy::

    trainer = AdaptiveBatchTrainer(
        model=model, args=args, train_dataset=train, data_collator=collator,
        policy=InfoBatch(prune_ratio=0.5),
    )
    trainer.train()

What it changes, and nothing else:

* **The training loader.** The sampler is built over ``train_dataset`` once the Trainer's
  Accelerator exists (so it shards by the process group, one disjoint share per process), at
  ``per_device_train_batch_size`` (``sampler_options`` passes the sampler's other arguments: a
  sizing policy needs ``min_batch_size`` and ``max_batch_size``). The loader goes through
  Accelerate's preparation with the sampler kept whole
  (:func:`~adaptive_batch.integrations.accelerate.prepare_loader`), and through a
  :class:`~adaptive_batch.StepFeedback` the Trainer drives (it fetches ``gradient_accumulation_steps``
  batches before their steps: ``fetched_ahead=True``).
* **The training loss.** Per-sequence losses come from the training forward: the LM head's
  logits against the batch's ``labels`` shifted by one, as the model shifts them, ``-100``
  (padding, prompts) left out (``"causal_lm_cross_entropy"``). The loss the Trainer backpropagates
  is the model's own token-mean loss with each sequence weighted by the epoch plan (InfoBatch's
  up-weights) and an in-batch rule's choice: with every weight 1 it equals the model's loss, and it
  is normalised as the Trainer normalises it (``num_items_in_batch`` under gradient
  accumulation). Evaluation is untouched.
* **Checkpoints.** Each checkpoint folder gets ``adaptive_batch.pt`` (the sampler's and the stage's
  state, every rank's); ``trainer.train(resume_from_checkpoint=...)`` loads it and continues with
  the same batches and weights, the Trainer's epoch count taken from the sampler's (a pruned epoch
  has fewer steps than the Trainer's count assumes).

An epoch plan without ``num_epochs`` (InfoBatch, stale Selective-Backprop) gets the run's
``num_train_epochs``. The learning-rate schedule still spans the steps of full epochs: a pruning
policy ends the run before the schedule does (its last value is not reached), as the Trainer
counts steps before any epoch is pruned.

With gradient accumulation, each epoch's last group is stepped where the epoch's own batches end
(the Trainer counts them once, for full epochs); a sizing policy's epochs have no length known in
advance, so its last group may carry into the next epoch's first step, as with any loader without
a length.

Tested with transformers 5.24: the epoch count on resume and each epoch's length override the
Trainer's ``_init_training_state`` and ``_run_epoch``, private methods; another release may need
this module updated.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..contract import plan_rule_of, sizing_rule_of
from ..errors import AdaptiveBatchError
from ..load import IndexedDataset, IndexedSample
from ..optional import require
from ..probe import sequence_cross_entropy
from ..sample import AdaptiveBatchSampler
from ..train import StepFeedback
from .accelerate import prepare_loader

transformers = require("transformers", "transformers", "AdaptiveBatchTrainer")

__all__ = ["STATE_FILE", "AdaptiveBatchTrainer"]

#: The file each checkpoint folder gets: the sampler's and the stage's state.
STATE_FILE = "adaptive_batch.pt"

_CAUSAL_LM = sequence_cross_entropy(shift=True)


class _IndexedCollator:
    """The Trainer's collator on the samples, their dataset indices beside them."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, items: list[IndexedSample]) -> IndexedSample:
        indices = torch.tensor([item.index for item in items], dtype=torch.long)
        return IndexedSample(indices, self.collate([item.sample for item in items]))


class _SaveStageState(transformers.TrainerCallback):
    """Writes the stage's state into each checkpoint folder (every rank gathers; the main
    process writes)."""

    def __init__(self, trainer: AdaptiveBatchTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        stage = self.trainer.stage
        if stage is None:
            return
        saved = stage.state_dict()  # a collective under DDP: every rank calls it
        if args.should_save:
            folder = os.path.join(
                args.output_dir, f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-"
                f"{state.global_step}"
            )  # fmt: skip
            torch.save(saved, os.path.join(folder, STATE_FILE))


class AdaptiveBatchTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains on an adaptive sampler's batches (see the module).

    Args:
        policy: the sampler's policy (an epoch plan such as ``InfoBatch()``, ``SmallLoss()``,
            ``RandomSubset(0.7)``, an in-batch rule, a sizing rule, or a ``Policy``).
        sampler_options: more arguments for :class:`~adaptive_batch.AdaptiveBatchSampler`
            (``seed`` defaults to the training arguments' seed).
        *args, **kwargs: the ``Trainer``'s own.

    Attributes:
        sampler: the :class:`~adaptive_batch.AdaptiveBatchSampler`, once training has built it.
        stage: the :class:`~adaptive_batch.StepFeedback` the Trainer iterates.
    """

    def __init__(
        self,
        *args: Any,
        policy: Any = None,
        sampler_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        options = dict(sampler_options or {})
        if sizing_rule_of(policy) is not None and not {"min_batch_size", "max_batch_size"} <= set(
            options
        ):
            raise AdaptiveBatchError(
                f"{type(policy).__name__} resizes batches: give the sizes it may use, "
                "sampler_options={'min_batch_size': ..., 'max_batch_size': ...}"
            )
        self.policy = policy
        self.sampler_options = options
        self.sampler: AdaptiveBatchSampler | None = None
        self.stage: StepFeedback | None = None
        self.add_callback(_SaveStageState(self))

    # -- the training loader ---------------------------------------------------------------------

    def get_train_dataloader(self) -> Any:
        if self.stage is not None:
            return self.stage
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset, collate = self.train_dataset, self.data_collator
        if hasattr(dataset, "column_names") and hasattr(self, "_remove_unused_columns"):
            dataset = self._remove_unused_columns(dataset, description="training")
        elif hasattr(self, "_get_collator_with_removed_columns"):
            collate = self._get_collator_with_removed_columns(collate, description="training")
        size = self._train_batch_size
        options = {
            "batch_size": size,
            "min_batch_size": size,
            "max_batch_size": size,
            "seed": self.args.seed,
            **self.sampler_options,
        }
        plan = plan_rule_of(self.policy)
        if plan is not None and getattr(plan, "num_epochs", 0) is None and self.args.max_steps <= 0:
            plan.num_epochs = math.ceil(self.args.num_train_epochs)  # where the run ends
        self.sampler = AdaptiveBatchSampler(dataset, policy=self.policy, **options)
        workers = self.args.dataloader_num_workers
        loader = DataLoader(
            IndexedDataset(dataset),
            batch_sampler=self.sampler,
            collate_fn=_IndexedCollator(collate),
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None,
        )
        prepared = prepare_loader(self.accelerator, loader)
        self.stage = StepFeedback(
            prepared, None, sampler=self.sampler, loss=_CAUSAL_LM, targets="labels",
            fetched_ahead=True,
        )  # fmt: skip
        return self.stage

    def _init_training_state(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        epochs, steps = super()._init_training_state(*args, **kwargs)
        checkpoint = kwargs.get("resume_from_checkpoint", args[3] if len(args) > 3 else None)
        if checkpoint is None or self.stage is None:
            return epochs, steps
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            raise AdaptiveBatchError(
                f"{checkpoint} holds no {STATE_FILE}: it was not saved by an AdaptiveBatchTrainer, "
                "so the sampler cannot continue where it stopped"
            )
        self.stage.load_state_dict(torch.load(path, weights_only=True))
        assert self.sampler is not None
        # The sampler resumes its pass itself: no batch is skipped, and the epochs are its own.
        return self.sampler.next_epoch, 0

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # The Trainer counts an epoch's batches once, before any epoch is pruned, and ends its
        # last gradient-accumulation group by that count: give it this epoch's (fixed-size
        # batches, where the sampler knows it; a sizing rule's epochs have no length).
        stage, sampler = self.stage, self.sampler
        if stage is not None and sampler is not None and "steps_in_epoch" in kwargs:
            stage.flush()  # the last epoch's scores are in: the plan about to be drawn sees them
            try:
                batches = len(stage)
            except TypeError:
                batches = None
            if batches is not None:
                batches -= sampler.resume_position // sampler.batch_size
                accumulation = self.args.gradient_accumulation_steps
                kwargs["steps_in_epoch"] = batches
                kwargs["num_update_steps_per_epoch"] = max(1, math.ceil(batches / accumulation))
        return super()._run_epoch(*args, **kwargs)

    # -- the training step -----------------------------------------------------------------------

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        stage = self.stage
        if stage is None:
            return super().training_step(model, inputs, num_items_in_batch)
        stage.begin_batch()
        loss = super().training_step(model, inputs, num_items_in_batch)
        stage.end_batch()
        return loss

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        stage = self.stage
        if stage is None or not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        # float32 as the models' own loss computes it
        per_sequence = _CAUSAL_LM.losses(logits.float(), labels)
        stage.report_losses(per_sequence)
        tokens = (labels[:, 1:] != -100).sum(dim=1)
        weights = torch.ones_like(per_sequence)
        plan = stage.next_weights(len(per_sequence), per_sequence.device)
        if plan is not None:
            weights = weights * plan
        selected = stage.select_in_batch(per_sequence)
        if selected is not None:
            mask, kept = selected
            weights = weights * mask.to(weights.dtype) * (len(per_sequence) / kept)
        summed = (per_sequence * tokens * weights).sum()
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            loss = summed / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = summed / tokens.sum().clamp_min(1)
        return (loss, outputs) if return_outputs else loss
