"""DDP: real multi-process runs (gloo, CPU) that must finish, agree and never hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_batch import AdaptiveBatchSampler, Feedback, Reason
from adaptive_batch.policies import EDBA
from adaptive_batch.sample.rank_frames import (
    STATS,
    decode_frame,
    encode_frame,
    frame_size,
    stats_key,
)

from . import ddp_workers

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, world: int = 2) -> dict[int, tuple[str, object]]:
    """Run ``target(rank, world, port, queue)`` in ``world`` processes; fail instead of hanging."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=target, args=(r, world, port, results)) for r in range(world)
    ]
    for p in processes:
        p.start()
    deadline = time.monotonic() + TIMEOUT
    for p in processes:
        p.join(max(1.0, deadline - time.monotonic()))
    hung = [p for p in processes if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} rank(s) still running after {TIMEOUT} s: a hang"
    out = {}
    while len(out) < world:
        rank, status, payload = results.get(timeout=5)
        out[rank] = (status, payload)
    return out


def test_torchrun_example_trains_two_ranks_in_step(tmp_path):
    start = time.monotonic()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free rendezvous port, not the fixed default
        "--nproc_per_node=2",
        str(ROOT / "examples" / "ddp_train.py"),
        "--epochs",
        "2",
        "--samples",
        "512",
        "--report",
        str(tmp_path / "rank"),
    ]
    # faulthandler prints every thread's Python stack if a rank dies of a signal.
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path, env=env
    )
    written = sorted(p.name for p in tmp_path.glob("rank-*.json"))
    assert run.returncode == 0, f"reports {written}\n{run.stdout[-1500:]}\n{run.stderr[-4000:]}"
    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    sizes = [r["sizes"] for r in reports]
    assert sizes[0] == sizes[1] and len(set(sizes[0])) > 1  # identical, and adaptive
    for epoch in range(2):
        a, b = (set(r["seen"][epoch]) for r in reports)
        assert not a & b and a | b == set(range(512))  # disjoint and complete
    print(
        f"torchrun example: 2 ranks, {len(sizes[0])} steps each, {time.monotonic() - start:.1f} s"
    )


def test_ddp_weights_each_ranks_kept_subset_equally():
    out = spawn(ddp_workers.gradient_weighting)
    for rank, (status, payload) in out.items():
        assert status == "ok", f"rank {rank}: {payload}"
    result = out[0][1]
    assert result["worst"] < 1e-5  # DDP's gradient is the mean of the ranks' subset means
    assert any(len(set(counts)) > 1 for counts in result["kept_counts"])  # kept counts did differ


def test_differently_configured_ranks_fail_on_every_rank_without_hanging():
    out = spawn(ddp_workers.mismatched_config)
    for rank, (status, payload) in out.items():
        assert status == "value-error", f"rank {rank}: {status} {payload}"
        assert "seed: rank 0 0, rank 1 1" in payload[0]


@pytest.mark.parametrize("worker", ["skipped_feedback", "bypassed_feedback"])
def test_a_rank_that_skips_feedback_makes_every_rank_raise_within_seconds(worker):
    # Rank 1 never reports feedback: without a filter at all (its sampler says so when the ranks
    # first agree), or with a filter it bypasses (its epoch ends while rank 0 waits for feedback).
    out = spawn(getattr(ddp_workers, worker))
    for rank, (status, payload) in out.items():
        assert status == "adaptive-batch-error", f"rank {rank}: {status} {payload}"
        message, seconds = payload
        assert "rank 1" in message and "feedback" in message, message
        assert seconds < 30, seconds  # not the process group's 30-minute timeout


def test_ranks_agree_on_scores_plans_and_step_counts():
    out = spawn(ddp_workers.planned_training)
    for rank, (status, payload) in out.items():
        assert status == "ok", f"rank {rank}: {payload}"
    first, second = out[0][1], out[1][1]
    for key in ("steps", "plans", "tables", "planned"):
        assert first[key] == second[key], key
    assert first["planned"][0] == 240 and min(first["planned"][1:3]) < 240  # InfoBatch pruned
    for epoch, planned in enumerate(first["planned"]):
        a, b = set(first["drawn"][epoch]), set(second["drawn"][epoch])
        assert not a & b and len(a | b) == planned - planned % 2  # disjoint shares of the plan


def test_replica_arguments_are_checked():
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        AdaptiveBatchSampler(100, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas must be at least 1"):
        AdaptiveBatchSampler(100, num_replicas=0, rank=0)
    with pytest.raises(ValueError, match=r"needs torch\.distributed initialised"):
        AdaptiveBatchSampler(100, policy=EDBA(), num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="cannot give each of 4 replicas one"):
        AdaptiveBatchSampler(3, num_replicas=4, rank=0)


def test_shards_are_disjoint_and_equal_without_a_process_group():
    shards = [
        list(AdaptiveBatchSampler(103, batch_size=10, num_replicas=3, rank=r, seed=5))
        for r in range(3)
    ]
    flat = [[i for batch in shard for i in batch] for shard in shards]
    assert [len(f) for f in flat] == [34, 34, 34]  # 103 // 3; one index rotates out per epoch
    assert len(set().union(*flat)) == 102 and not set(flat[0]) & set(flat[1])
    assert [len(s) for s in shards] == [len(shards[0])] * 3  # the same step count on every rank


def test_sampler_state_records_the_replica_count():
    state = AdaptiveBatchSampler(100, num_replicas=2, rank=0).state_dict()
    with pytest.raises(ValueError, match="num_replicas"):
        AdaptiveBatchSampler(100, num_replicas=4, rank=0).load_state_dict(state)
    AdaptiveBatchSampler(100, num_replicas=2, rank=1).load_state_dict(
        state
    )  # rank 0's, on rank 1: fine
    kept = torch.tensor([0])
    with pytest.raises(ValueError):
        AdaptiveBatchSampler(100).feedback(Feedback(kept, kept[:0]))


def test_a_step_swaps_one_tensor_and_pickles_nothing():
    out = spawn(ddp_workers.counted_collectives)
    for rank, (status, payload) in out.items():
        assert status == "ok", f"rank {rank}: {payload}"
    first, second = out[0][1], out[1][1]
    for key in ("steps", "sizes", "tables", "candidates", "sizer"):
        assert first[key] == second[key], key
    assert len(set(first["sizes"])) > 1  # GNS did resize
    assert first["candidates"] == 3 * 240
    for epoch, steps in enumerate(first["steps"]):
        # a frame per step, one at the epoch's end and (after the first) one at its start
        assert first["gathers"][epoch] == steps + 1 + (epoch > 0), first
        assert first["objects"][epoch] == 1, first  # the start's configuration check only


def test_feedback_a_frame_cannot_carry_is_swapped_whole():
    out = spawn(ddp_workers.unframeable_feedback)
    for rank, (status, payload) in out.items():
        assert status == "ok", f"rank {rank}: {payload}"
    first, second = out[0][1], out[1][1]
    assert first == second
    assert first["candidates"] == 40  # both ranks' 20 indices, the 8-candidate report too
    assert first["kept"] == [1] * 40
    assert first["losses"] == pytest.approx([i / 100 for i in range(40)])


@settings(max_examples=60)
@given(
    indices=st.lists(st.integers(0, 2**40), min_size=1, max_size=12, unique=True),
    num_kept=st.integers(0, 12),
    stats=st.dictionaries(st.text(min_size=1, max_size=6), st.floats(allow_nan=False), max_size=5),
    with_losses=st.booleans(),
    reason=st.sampled_from(Reason.ALL),
)
def test_a_frame_carries_a_feedback_exactly(indices, num_kept, stats, with_losses, reason):
    num_kept = min(num_kept, len(indices))
    kept, dropped = torch.tensor(indices[:num_kept]), torch.tensor(indices[num_kept:])
    dropped = dropped.to(torch.long)
    losses = torch.rand(len(indices)) if with_losses else None
    feedback = Feedback(kept.to(torch.long), dropped, reason, stats, losses)
    frame = encode_frame("feedback", 1, (7, 0, 0), 12, feedback)
    assert frame.shape == (frame_size(12),)  # the same for every feedback: one gather fits all
    decoded = decode_frame(frame.numpy(), 12, sorted(stats))
    assert (decoded.kind, decoded.rank, decoded.counters, decoded.fits) == (
        "feedback",
        1,
        (7, 0, 0),
        True,
    )
    assert decoded.kept.tolist() == indices[:num_kept]
    assert decoded.dropped.tolist() == indices[num_kept:]
    assert decoded.reason == reason and decoded.stats == stats
    if with_losses:
        assert decoded.losses.tolist() == losses.tolist()
    else:
        assert decoded.losses is None
    assert decoded.stats_key == stats_key(sorted(stats))


def test_a_frame_marks_what_it_cannot_carry():
    def fits(count: int, capacity: int, reason: str = Reason.KEEP_ALL, stats=None) -> bool:
        indices = torch.arange(count)
        feedback = Feedback(indices, torch.empty(0, dtype=torch.long), reason, stats or {})
        frame = encode_frame("feedback", 0, (1, 0, 0), capacity, feedback)
        return decode_frame(frame.numpy(), capacity, sorted(stats or {})).fits

    assert fits(6, 6) and not fits(7, 6)
    assert not fits(2, 6, reason="a reason of the user's own")
    assert not fits(2, 6, stats={f"s{i}": 1.0 for i in range(STATS + 1)})


def test_a_checkpoint_mid_epoch_resumes_the_same_batches_on_every_rank():
    out = spawn(ddp_workers.resumed_mid_epoch)
    for rank, (status, payload) in out.items():
        assert status == "ok", f"rank {rank}: {payload}"
        assert payload["same"], payload
        assert len(payload["sizes"]) > 1  # GNS resized
        assert payload["in_transit"] == 1  # a step's feedback was between the ranks
