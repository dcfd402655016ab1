"""The Hugging Face Trainer with an adaptive sampler: a tiny randomly initialised GPT-2, built here
(no download), trained on sequences of random tokens."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adaptive_batch import AdaptiveBatchError  # noqa: E402
from adaptive_batch.integrations.transformers import (  # noqa: E402
    STATE_FILE,
    AdaptiveBatchTrainer,
)
from adaptive_batch.policies import (  # noqa: E402
    GradientNoiseScale,
    InBatchSmallLoss,
    InfoBatch,
)
from adaptive_batch.probe import LOSSES  # noqa: E402

VOCAB, LENGTH = 48, 12
ROOT = Path(__file__).resolve().parents[1]


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


class Sequences(torch.utils.data.Dataset):
    """Token sequences with a learnable pattern; some end in padding (labels -100)."""

    def __init__(self, count: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (count, 1), generator=generator)
        step = torch.randint(1, 4, (count, 1), generator=generator)
        self.ids = (start + step * torch.arange(LENGTH)) % VOCAB
        self.lengths = torch.randint(LENGTH // 2, LENGTH + 1, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, length = self.ids[index], int(self.lengths[index])
        mask = (torch.arange(LENGTH) < length).long()
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def arguments(tmp_path, **overrides) -> transformers.TrainingArguments:
    options = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "num_train_epochs": 3,
        "learning_rate": 3e-3,
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        **overrides,
    }
    return transformers.TrainingArguments(**options)


class Recording(AdaptiveBatchTrainer):
    """Records each training step's dataset indices and plan weights."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[list[int], list[float] | None]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.stage is not None and model.training:
            weights = self.stage.batch_weights()
            self.steps.append(
                (
                    self.stage.current_indices.tolist(),
                    None if weights is None else [round(float(w), 6) for w in weights],
                )
            )
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def trainer(
    tmp_path, policy, data=None, cls=Recording, eval_data=None, **overrides
) -> AdaptiveBatchTrainer:
    return cls(
        model=tiny_gpt2(),
        args=arguments(tmp_path, **overrides),
        train_dataset=data if data is not None else Sequences(96),
        eval_dataset=eval_data,
        data_collator=transformers.default_data_collator,
        policy=policy,
    )


def test_per_sequence_losses_are_the_models_own_with_its_shift():
    model, data = tiny_gpt2(), Sequences(6)
    batch = transformers.default_data_collator([data[i] for i in range(6)])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = LOSSES["causal_lm_cross_entropy"].losses(logits, batch["labels"])
    for row in range(6):  # the model's own loss, one sequence at a time: it shifts the labels
        one = {key: value[row : row + 1] for key, value in batch.items()}
        torch.testing.assert_close(ours[row], model(**one).loss)


def test_the_training_loss_is_the_models_own_when_every_weight_is_one(tmp_path):
    run = trainer(tmp_path, policy=None)
    stage = run.get_train_dataloader()
    batches = iter(stage)
    run.model.train()
    for _ in range(2):  # the Trainer fetches (here: one batch) before each step
        inputs = next(batches)
        stage.begin_batch()
        indices = stage.current_indices
        ours = run.compute_loss(run.model, dict(inputs))
        theirs = transformers.Trainer.compute_loss(run, run.model, dict(inputs))
        torch.testing.assert_close(ours, theirs)
        stage.end_batch()
        assert not run.sampler.ledger.losses[indices].isnan().any()  # reported
    assert run.sampler.num_feedback == 2


def test_infobatch_prunes_later_epochs_and_every_batch_is_scored(tmp_path):
    run = trainer(tmp_path, policy=InfoBatch(prune_ratio=0.5))
    run.train()
    sampler = run.sampler
    assert sampler.policy.num_epochs == 3  # from num_train_epochs
    assert sampler.num_feedback == len(run.steps) == run.state.global_step
    per_epoch = [len(sampler.order.decide(epoch).drawn.nonzero()) for epoch in range(3)]
    assert per_epoch[0] == 96 and per_epoch[1] < 96  # pruned once scored
    assert int(sampler.ledger.losses.isnan().sum()) == 0  # every sequence has a loss
    weighted = [w for _, weights in run.steps if weights for w in weights]
    assert max(weighted) > 1.0  # InfoBatch's up-weights reached the loss


def test_a_resume_mid_epoch_continues_the_same_batches_and_weights(tmp_path):
    def build(folder, **overrides):
        return trainer(
            folder, policy=InfoBatch(prune_ratio=0.5), save_strategy="steps",
            save_steps=17, **overrides,
        )  # fmt: skip

    first = build(tmp_path / "first")
    first.train()
    checkpoint = tmp_path / "first" / "checkpoint-17"
    assert (checkpoint / STATE_FILE).is_file()
    resumed = build(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.steps == first.steps[17:]
    assert len(resumed.steps) > 0
    assert resumed.state.global_step == first.state.global_step


def test_small_loss_in_batch_trains_on_the_kept_sequences(tmp_path):
    run = trainer(tmp_path, policy=InBatchSmallLoss(0.25, ramp_epochs=1), num_train_epochs=2)
    run.train()
    assert run.sampler.num_feedback == run.state.global_step == 24
    # epoch 0 keeps all (the ramp); epoch 1 leaves out the largest quarter of each batch of 8
    assert run.sampler.num_kept == 96 + 12 * 6


def test_a_sizing_policy_needs_its_size_range(tmp_path):
    with pytest.raises(AdaptiveBatchError, match="min_batch_size"):
        trainer(tmp_path, policy=GradientNoiseScale())


def test_two_processes_agree_on_plans_and_steps(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(ROOT / "tests" / "hf_app.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    zero, one = ranks
    for key in ("global_step", "epochs", "scores"):
        assert zero[key] == one[key], key  # the same plans (from the same scores), same steps
    assert zero["epochs"][0] == 96 and zero["epochs"][1] < 96  # every rank pruned alike
    assert [len(i) for i, _ in zero["steps"]] == [len(i) for i, _ in one["steps"]]
    # the first epoch: 48 sequences per process, in batches of 8
    drawn = [{i for indices, _ in r["steps"][:6] for i in indices} for r in ranks]
    assert not drawn[0] & drawn[1]  # disjoint shares
    assert drawn[0] | drawn[1] == set(range(96))  # together, every sequence


def test_gradient_accumulation_and_evaluation_inside_training(tmp_path):
    # Two micro-batches per optimizer step (the Trainer fetches both before the first), and an
    # evaluation each epoch: every micro-batch is reported, evaluation is not.
    run = trainer(
        tmp_path, policy=InfoBatch(prune_ratio=0.5), gradient_accumulation_steps=2,
        eval_strategy="epoch", eval_data=Sequences(16, seed=1),
    )  # fmt: skip
    run.train()
    assert run.sampler.num_feedback == len(run.steps)
    assert run.state.global_step == sum(math.ceil(n / 2) for n in _steps_per_epoch(run))
    assert int(run.sampler.ledger.losses.isnan().sum()) == 0


def _steps_per_epoch(run) -> list[int]:
    sizes = [run.sampler.order.decide(e).drawn.sum().item() for e in range(3)]
    return [math.ceil(n / 8) for n in sizes]
