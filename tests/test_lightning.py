"""Lightning: either stage under a Trainer, the feedback matched to its own batch although the
Trainer fetches one ahead, a checkpoint resume that continues the same batches, and 2-rank DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from adaptive_batch import AdaptiveBatchError

from .lightning_app import Classifier, trainer, uninterrupted_and_resumed

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("look_ahead", "training_step")


def by_epoch(rows: list[dict], key: str = "indices") -> dict[int, list[int]]:
    drawn: dict[int, list[int]] = defaultdict(list)
    for row in rows:
        drawn[row["epoch"]] += row.get("candidates", row[key])
    return drawn


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_trains_under_a_trainer(tmp_path, stage):
    module = Classifier(stage)
    trainer(tmp_path).fit(module)
    rows, sampler = module.log_rows, module.stage.sampler
    assert sampler.num_feedback == len(rows) == module.stage.num_batches
    for epoch, drawn in by_epoch(rows).items():
        assert len(drawn) == len(set(drawn)), epoch  # no index twice in an epoch
        assert set(drawn) <= set(range(160))
    if stage == "look_ahead":
        assert all(set(r["indices"]) <= set(r["candidates"]) for r in rows)
        assert len({len(r["candidates"]) for r in rows}) > 1  # EDBA resized the batches
        assert sum(len(d) for d in by_epoch(rows).values()) == 3 * 160
    else:
        # Each batch's reported losses are its own training forward's, though the Trainer had
        # fetched the next batch before that forward ran: the ledger's latest loss of every index
        # trained in the last epoch is the loss the step computed for it.
        assert module.stage.num_unmeasured == 0
        last = [r for r in rows if r["epoch"] == 2]
        indices = torch.tensor([i for r in last for i in r["indices"]])
        expected = torch.tensor([v for r in last for v in r["losses"]])
        torch.testing.assert_close(sampler.ledger.losses[indices], expected)
        assert len(by_epoch(rows)[1]) < 160  # InfoBatch pruned the second epoch
        assert sampler.policy.plan.num_epochs == 3  # the trainer's max_epochs, set by the callback


@pytest.mark.parametrize("stage", STAGES)
def test_a_checkpoint_resume_continues_the_same_batches(tmp_path, stage):
    first, resumed, step = uninterrupted_and_resumed(stage, tmp_path)
    assert len(resumed) == len(first) - step > 0
    for expected, got in zip(first[step:], resumed, strict=True):
        assert got["indices"] == expected["indices"]
        assert got.get("candidates") == expected.get("candidates")
        assert got["losses"] == pytest.approx(expected["losses"], rel=1e-5, abs=1e-6)


def test_a_checkpoint_after_an_epochs_last_batch_resumes_with_the_next_epoch(tmp_path):
    # Lightning restores such a checkpoint as the epoch's end and iterates the next epoch at
    # once: the sampler must not hand it the (empty) rest of the saved one.
    module = Classifier("training_step")
    trainer(tmp_path / "lengths").fit(module)
    first_epoch = sum(row["epoch"] == 0 for row in module.log_rows)
    first, resumed, step = uninterrupted_and_resumed("training_step", tmp_path, step=first_epoch)
    assert step == first_epoch and len(resumed) == len(first) - step > 0
    assert [r["indices"] for r in resumed] == [r["indices"] for r in first[step:]]


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_under_ddp_agree_and_resume(tmp_path, stage):
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "lightning_app.py"), stage, str(tmp_path), "2"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:  # every rank continues its own batches after the resume
        step = rank["step"]
        assert [r["indices"] for r in rank["resumed"]] == [
            r["indices"] for r in rank["first"][step:]
        ]
    zero, one = (rank["first"] for rank in ranks)
    assert len(zero) == len(one)  # the same number of steps
    key = "candidates" if stage == "look_ahead" else "indices"
    assert [len(r[key]) for r in zero] == [len(r[key]) for r in one]  # the same sizes
    for epoch, drawn in by_epoch(zero).items():  # disjoint shares
        assert not set(drawn) & set(by_epoch(one)[epoch]), epoch


def test_the_callback_refuses_a_stage_the_trainer_would_mismatch(tmp_path):
    module = Classifier("training_step")
    build = module.train_dataloader

    def without_fetched_ahead():
        stage = build()
        stage.fetched_ahead = False
        return stage

    module.train_dataloader = without_fetched_ahead
    with pytest.raises(AdaptiveBatchError, match="fetched_ahead=True"):
        trainer(tmp_path).fit(module)
