"""Functions run in processes spawned by test_distributed.py (importable by the children)."""

from __future__ import annotations

import hashlib
import os
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from adaptive_batch import (
    AdaptiveBatchError,
    AdaptiveBatchSampler,
    IndexedDataset,
    StepFeedback,
    SubsetFilter,
)
from adaptive_batch.policies import EDBA, InfoBatch

from .synthetic import blobs


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))


def _data(num: int = 240) -> IndexedDataset:
    return IndexedDataset(blobs(num))


def gradient_weighting(rank: int, world: int, port: int, results) -> None:
    """Each step: DDP's gradient must equal the mean over ranks of each rank's mean gradient over
    its own kept samples, whatever the ranks' kept counts."""
    try:
        _init(rank, world, port)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        ddp = DistributedDataParallel(model)
        data = _data()
        sampler = AdaptiveBatchSampler(
            data, policy=EDBA(seed=0), batch_size=24, min_batch_size=6, max_batch_size=48
        )
        batches = SubsetFilter(DataLoader(data, batch_sampler=sampler), model, sampler=sampler)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
        worst, kept_counts = 0.0, []
        for step, (x, y) in enumerate(batches):
            local = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
            expected = [g.clone() for g in local]
            for g in expected:
                dist.all_reduce(g)
                g /= world
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            worst = max(
                worst,
                max(
                    float((p.grad - e).abs().max())
                    for p, e in zip(model.parameters(), expected, strict=True)
                ),
            )
            optimizer.step()
            counts = [None] * world
            dist.all_gather_object(counts, len(y))
            kept_counts.append(counts)
            if step == 12:
                break
        results.put((rank, "ok", {"worst": worst, "kept_counts": kept_counts}))
    except Exception:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def mismatched_config(rank: int, world: int, port: int, results) -> None:
    """Rank 1 uses another seed: both ranks must raise, not hang."""
    try:
        _init(rank, world, port)
        sampler = AdaptiveBatchSampler(
            _data(), policy=EDBA(), batch_size=24, min_batch_size=6, seed=rank
        )
        next(iter(sampler))
        results.put((rank, "ok", None))
    except ValueError as error:
        results.put((rank, "value-error", str(error)))
    except Exception:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _skipping(rank: int, world: int, port: int, results, *, bypass: bool) -> None:
    """Rank 1 trains without reporting feedback: every rank must raise, naming rank 1."""
    start = time.monotonic()
    try:
        _init(rank, world, port)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        data = _data()
        sampler = AdaptiveBatchSampler(data, policy=EDBA(seed=0), batch_size=24, min_batch_size=6)
        loader = DataLoader(data, batch_sampler=sampler)
        if rank == 0 or bypass:
            batches = SubsetFilter(loader, model, sampler=sampler)
        # With bypass, rank 1 builds the filter but iterates the loader itself.
        source = batches if rank == 0 else loader
        for _ in range(3):
            for _batch in source:
                pass
        results.put((rank, "ok", None))
    except AdaptiveBatchError as error:
        results.put((rank, "adaptive-batch-error", (str(error), time.monotonic() - start)))
    except Exception:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def skipped_feedback(rank: int, world: int, port: int, results) -> None:
    _skipping(rank, world, port, results, bypass=False)


def bypassed_feedback(rank: int, world: int, port: int, results) -> None:
    _skipping(rank, world, port, results, bypass=True)


def planned_training(rank: int, world: int, port: int, results) -> None:
    """InfoBatch on two ranks, fed by the training step: tables, plans and step counts agree."""
    try:
        _init(rank, world, port)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        ddp = DistributedDataParallel(model)
        data = _data()
        policy = InfoBatch(prune_ratio=0.5, num_epochs=4)
        sampler = AdaptiveBatchSampler(
            data, policy=policy, batch_size=12, min_batch_size=12, max_batch_size=12
        )
        batches = StepFeedback(DataLoader(data, batch_sampler=sampler), ddp, sampler=sampler)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
        report = {"steps": [], "plans": [], "tables": [], "drawn": []}
        for epoch in range(4):
            steps, drawn = 0, []
            for x, y in batches:
                drawn += batches.current_indices.tolist()
                optimizer.zero_grad()
                F.cross_entropy(ddp(x), y).backward()
                optimizer.step()
                steps += 1
            batches.flush()
            table = sampler.ledger
            report["steps"].append(steps)
            report["plans"].append(sampler.order.digest(epoch))
            report["tables"].append(
                hashlib.sha1(
                    table.losses.nan_to_num(-1).numpy().tobytes()
                    + table.times_kept.numpy().tobytes()
                ).hexdigest()
            )
            report["drawn"].append(drawn)
            report.setdefault("planned", []).append(int(sampler.order.decide(epoch).drawn.sum()))
        results.put((rank, "ok", report))
    except Exception:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
