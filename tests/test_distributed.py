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

from adaptive_batch import AdaptiveBatchSampler, Feedback
from adaptive_batch.policies import EDBA

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
        assert "seed: rank 0 0, rank 1 1" in payload


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
