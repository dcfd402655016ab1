"""TrajectoryLogger: rows match what the sampler saw, CSV and TensorBoard agree, resume appends."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from adaptive_batch import (
    AdaptiveBatchError,
    AdaptiveBatchSampler,
    Feedback,
    IndexedDataset,
    Reason,
    StepFeedback,
    SubsetFilter,
    TrajectoryLogger,
)
from adaptive_batch.policies import EDBA, GradientNoiseScale

from .synthetic import blobs


def read_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def train(batches, model, epochs: int = 1, optimizer=None) -> None:
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(epochs):
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()


def edba_run(tmp_path, *, every: int = 1, tensorboard: bool = False):
    data = blobs(240, classes=3, dim=8, seed=0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sampler = AdaptiveBatchSampler(
        data, policy=EDBA(seed=0), batch_size=20, min_batch_size=10, max_batch_size=120, seed=0
    )
    seen: list[dict] = []  # what the sampler saw, recorded independently of the logger
    sampler.add_listener(
        lambda s, f: seen.append(
            {
                "step": s.num_feedback,
                "candidates": f.batch_size,
                "kept": f.num_kept,
                "next": s.batch_size,
                "loss": f.stats["loss"],
                "reason": f.reason,
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
    )
    logger = TrajectoryLogger(
        sampler,
        csv_path=tmp_path / "run.csv",
        tensorboard_dir=tmp_path / "tb" if tensorboard else None,
        optimizer=optimizer,
        every=every,
    )
    batches = SubsetFilter(
        DataLoader(IndexedDataset(data), batch_sampler=sampler), model, sampler=sampler
    )
    train(batches, model, epochs=2, optimizer=optimizer)
    logger.close()
    return sampler, seen, logger


def test_each_row_is_the_batch_the_sampler_saw(tmp_path):
    sampler, seen, logger = edba_run(tmp_path)
    rows = read_rows(tmp_path / "run.csv")
    assert len(rows) == len(seen) == sampler.num_feedback == logger.rows_written
    running_candidates = running_kept = 0
    for row, ref in zip(rows, seen, strict=True):
        running_candidates += ref["candidates"]
        running_kept += ref["kept"]
        assert int(row["step"]) == ref["step"]
        assert int(row["candidates"]) == ref["candidates"] and int(row["kept"]) == ref["kept"]
        assert float(row["kept_fraction"]) == pytest.approx(ref["kept"] / ref["candidates"])
        assert int(row["next_batch_size"]) == ref["next"]
        assert float(row["loss"]) == pytest.approx(ref["loss"], rel=1e-6)
        assert row["reason"] == ref["reason"]
        assert float(row["lr"]) == ref["lr"]
        assert int(row["candidates_total"]) == running_candidates
        assert int(row["kept_total"]) == running_kept
    # EDBA's own numbers are columns too, and the sizes really changed.
    assert {"grad_sq_norm", "grad_variance", "kept_grad_sq_norm"} <= set(rows[0])
    assert len({r["next_batch_size"] for r in rows}) > 1
    assert any(r["reason"] == Reason.SELECTED for r in rows)


def test_every_n_writes_every_nth_batch(tmp_path):
    sampler, seen, _ = edba_run(tmp_path, every=3)
    rows = read_rows(tmp_path / "run.csv")
    assert [int(r["step"]) for r in rows] == list(range(3, sampler.num_feedback + 1, 3))
    by_step = {s["step"]: s for s in seen}
    assert all(int(r["candidates"]) == by_step[int(r["step"])]["candidates"] for r in rows)


def test_tensorboard_scalars_read_back_equal_the_csv(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    _, seen, _ = edba_run(tmp_path, tensorboard=True)
    events = accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"adaptive_batch/next_batch_size", "adaptive_batch/loss", "adaptive_batch/lr"} <= tags
    rows = read_rows(tmp_path / "run.csv")
    for tag, column in (("next_batch_size", "next_batch_size"), ("loss", "loss"), ("kept", "kept")):
        scalars = events.Scalars(f"adaptive_batch/{tag}")
        assert [s.step for s in scalars] == [int(r["step"]) for r in rows]
        assert [s.value for s in scalars] == pytest.approx([float(r[column]) for r in rows])
    counts = {t.rpartition("/")[2] for t in tags if t.startswith("adaptive_batch/reason/")}
    assert counts == {s["reason"] for s in seen}
    selected = events.Scalars(f"adaptive_batch/reason/{Reason.SELECTED}")
    assert selected[-1].value == sum(s["reason"] == Reason.SELECTED for s in seen)


def test_a_resumed_run_appends_and_continues_the_steps(tmp_path):
    data = blobs(120, seed=1)
    model = nn.Linear(8, 3)

    def sampler_of():
        return AdaptiveBatchSampler(
            data, policy=GradientNoiseScale(), batch_size=10, min_batch_size=10, seed=0
        )

    first = sampler_of()
    with TrajectoryLogger(first, csv_path=tmp_path / "run.csv"):
        batches = StepFeedback(
            DataLoader(IndexedDataset(data), batch_sampler=first), model, sampler=first
        )
        for step, (x, y) in enumerate(batches):
            nn.functional.cross_entropy(model(x), y).backward()
            if step == 4:
                break
        state = first.state_dict()  # reports the pending batch first
        batches.close()
    before = read_rows(tmp_path / "run.csv")
    resumed = sampler_of()
    resumed.load_state_dict(state)
    with TrajectoryLogger(resumed, csv_path=tmp_path / "run.csv"):
        batches = StepFeedback(
            DataLoader(IndexedDataset(data), batch_sampler=resumed), model, sampler=resumed
        )
        train(batches, model)
        batches.close()
    rows = read_rows(tmp_path / "run.csv")
    steps = [int(r["step"]) for r in rows]
    assert rows[: len(before)] == before and steps == list(range(1, len(rows) + 1))
    assert int(rows[-1]["candidates_total"]) == 120  # one whole epoch over both halves
    # The sizing rule's noise estimates are columns: B_simple = tr(Sigma) / |G|^2.
    last = rows[-1]
    scale = float(last["noise_variance"]) / float(last["noise_sq_norm"])
    assert float(last["noise_scale"]) == pytest.approx(scale)


def test_a_column_that_appears_later_widens_the_file(tmp_path):
    sampler = AdaptiveBatchSampler(8, batch_size=4, min_batch_size=4, seed=0)
    logger = TrajectoryLogger(sampler, csv_path=tmp_path / "run.csv")
    empty = torch.tensor([], dtype=torch.long)
    first, second = list(sampler)
    sampler.feedback(Feedback(torch.tensor(first), empty, stats={"loss": 1.5}))
    sampler.feedback(Feedback(torch.tensor(second), empty, stats={"loss": 0.5, "margin": 2.0}))
    logger.close()
    for batch in sampler:  # a closed logger no longer listens
        sampler.feedback(Feedback(torch.tensor(batch), empty, stats={"loss": 0.1}))
    rows = read_rows(tmp_path / "run.csv")
    assert [r["loss"] for r in rows] == ["1.5", "0.5"]
    assert [r["margin"] for r in rows] == ["", "2.0"]
    logger.close()  # twice is fine


def test_only_rank_zero_writes_unless_asked(tmp_path):
    listeners: list = []
    other_rank = SimpleNamespace(rank=1, add_listener=listeners.append)
    TrajectoryLogger(other_rank, csv_path=tmp_path / "rank1.csv")
    assert not (tmp_path / "rank1.csv").exists() and len(listeners) == 1
    TrajectoryLogger(other_rank, csv_path=tmp_path / "rank1.csv", all_ranks=True)
    assert (tmp_path / "rank1.csv").exists()


def test_bad_arguments_are_refused():
    sampler = AdaptiveBatchSampler(8, batch_size=4, min_batch_size=4)
    with pytest.raises(AdaptiveBatchError, match="csv_path, a tensorboard_dir"):
        TrajectoryLogger(sampler)
    with pytest.raises(AdaptiveBatchError, match="every"):
        TrajectoryLogger(sampler, csv_path="x.csv", every=0)
    with pytest.raises(TypeError, match="callable"):
        sampler.add_listener("not a function")


@pytest.mark.parametrize("statistics", [False, True])
def test_the_logger_has_statistics_computed_only_when_asked_or_needed(tmp_path, statistics):
    from adaptive_batch.policies import InfoBatch

    data = blobs(64)
    model = nn.Sequential(nn.Linear(8, 3))
    sampler = AdaptiveBatchSampler(data, policy=InfoBatch(num_epochs=2), batch_size=16)
    batches = StepFeedback(
        DataLoader(IndexedDataset(data), batch_sampler=sampler), model, sampler=sampler
    )
    log = TrajectoryLogger(sampler, csv_path=tmp_path / "run.csv", statistics=statistics)
    # an epoch plan reads losses only: the head's gradient statistics are the logger's to ask for
    assert batches.wants_statistics is statistics
    train(batches, model)
    log.close()
    rows = read_rows(tmp_path / "run.csv")
    assert len(rows) == 4 and all(row["loss"] for row in rows)
    assert ("grad_sq_norm" in rows[0]) is statistics
    # a sizing rule needs them whatever the logger says
    rule = AdaptiveBatchSampler(data, policy=GradientNoiseScale(), batch_size=16)
    TrajectoryLogger(rule, csv_path=tmp_path / "gns.csv")
    assert rule.wants_gradient_statistics
