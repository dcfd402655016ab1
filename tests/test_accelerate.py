"""Accelerate: the adaptive loader through Accelerate's preparation without its re-sharding, on 2
processes (gloo), and save_state / load_state resuming the same batches on each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("accelerate")

from accelerate import Accelerator
from accelerate.data_loader import BatchSamplerShard

from adaptive_batch import AdaptiveBatchError, AdaptiveBatchSampler, IndexedDataset, StepFeedback
from adaptive_batch.integrations.accelerate import prepare_loader
from adaptive_batch.policies import InfoBatch

from .synthetic import blobs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "accelerate_train.py"
WORLD = 2


def launch(out: Path, *args: str) -> list[list[list[list[int]]]]:
    """Run the example on WORLD processes; what each rank trained on, per epoch."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={WORLD}", str(EXAMPLE), "--cpu", "--epochs", "3"]
    command += ["--report", str(out), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    reports = [json.loads(Path(f"{out}-{rank}.json").read_text()) for rank in range(WORLD)]
    assert all(report["world"] == WORLD for report in reports)
    return [report["trained"] for report in reports]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accelerate")
    full = launch(tmp / "full")
    first = launch(tmp / "first", "--save", str(tmp / "state"))
    rest = launch(tmp / "rest", "--resume", str(tmp / "state"))
    return full, first, rest


def test_each_process_trains_its_own_share_at_the_same_sizes(two_process_runs):
    full, _, _ = two_process_runs
    assert len(full[0]) == len(full[1]) == 3  # epochs
    for epoch in range(3):
        batches = [full[rank][epoch] for rank in range(WORLD)]
        assert [len(b) for b in batches[0]] == [len(b) for b in batches[1]]  # sizes agree
        shares = [[i for batch in rank_batches for i in batch] for rank_batches in batches]
        assert all(len(share) == len(set(share)) for share in shares)  # each index at most once
        assert not set(shares[0]) & set(shares[1])  # not re-sharded: disjoint, not overlapping
        assert set(shares[0]) | set(shares[1]) <= set(range(1024))
    # The sizing rule acted: not every batch is at the initial 16 (an epoch's last may be less).
    assert any(len(batch) > 16 for epoch in full[0] for batch in epoch)
    # InfoBatch drew the whole share (512 per process) before any score, then pruned.
    trained = [sum(map(len, epoch)) for epoch in full[0]]
    assert trained[0] == 512 and trained[1] < 512 and trained[2] < 512


def test_save_state_and_load_state_continue_the_same_batches(two_process_runs):
    full, first, rest = two_process_runs
    for rank in range(WORLD):
        assert len(first[rank]) == 1 and len(rest[rank]) == 2
        assert first[rank] + rest[rank] == full[rank]


def loader_and_sampler(**options):
    data = IndexedDataset(blobs(64, classes=3, dim=8))
    sampler = AdaptiveBatchSampler(
        data, policy=InfoBatch(num_epochs=2), batch_size=8, min_batch_size=4, **options
    )
    return DataLoader(data, batch_sampler=sampler), sampler


def test_prepare_loader_keeps_the_sampler_and_its_epoch():
    loader, sampler = loader_and_sampler(seed=0)
    prepared = prepare_loader(Accelerator(cpu=True), loader)
    assert prepared.batch_sampler is sampler
    model = torch.nn.Linear(8, 3)
    seen = []
    batches = StepFeedback(prepared, model, sampler=sampler)
    loss_fn = batches.weighted(
        lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")
    )
    for epoch in range(2):
        for x, y in batches:
            loss_fn(model(x), y)
            seen.append((epoch, len(y)))
    assert sum(size for epoch, size in seen if epoch == 0) == 64
    assert sampler.next_epoch == 2


def test_a_re_sharded_sampler_is_refused_with_the_fix():
    loader, sampler = loader_and_sampler(seed=0)
    # What accelerator.prepare(loader) does on several processes: a shard around our sampler.
    shard = BatchSamplerShard(sampler, num_processes=2, process_index=0)
    resharded = DataLoader(loader.dataset, batch_sampler=shard)
    with pytest.raises(AdaptiveBatchError, match="prepare_loader"):
        StepFeedback(resharded, torch.nn.Linear(8, 3), sampler=sampler)


def test_prepare_loader_refuses_what_it_cannot_keep():
    accelerator = Accelerator(cpu=True)
    data = IndexedDataset(blobs(64, classes=3, dim=8))
    with pytest.raises(AdaptiveBatchError, match="not an AdaptiveBatchSampler"):
        prepare_loader(accelerator, DataLoader(data, batch_size=8))
    loader, _ = loader_and_sampler()
    two_processes = SimpleNamespace(num_processes=2)  # a sampler built before Accelerator()
    with pytest.raises(AdaptiveBatchError, match="built for 1 process"):
        prepare_loader(two_processes, loader)
