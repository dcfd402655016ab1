"""Functions run in processes spawned by test_distributed.py (importable by the children)."""

from __future__ import annotations

import functools
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


def rank_worker(body=None, *, expected: tuple[type[Exception], str] | None = None):
    """A spawned rank: ``body(rank)``'s report goes to the test as ``(rank, "ok", report)``, any
    exception as ``(rank, "error", traceback)``; the process group is set up and torn down here.
    ``expected``: ``(an exception type, its status)``, reported as ``(rank, status, (message,
    seconds since the rank started))`` -- a test that wants every rank to raise, and soon."""

    def decorate(body):
        @functools.wraps(body)
        def worker(rank: int, world: int, port: int, results) -> None:
            start = time.monotonic()
            try:
                _init(rank, world, port)
                results.put((rank, "ok", body(rank)))
            except Exception as error:
                if expected is not None and isinstance(error, expected[0]):
                    results.put((rank, expected[1], (str(error), time.monotonic() - start)))
                else:
                    results.put((rank, "error", traceback.format_exc()))
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()

        return worker

    return decorate if body is None else decorate(body)


def table_digest(ledger) -> str:
    """One string for a ledger's losses and kept counts: equal on ranks that agree."""
    return hashlib.sha1(
        ledger.losses.nan_to_num(-1).numpy().tobytes() + ledger.times_kept.numpy().tobytes()
    ).hexdigest()


@rank_worker
def gradient_weighting(rank: int) -> object:
    """Each step: DDP's gradient must equal the mean over ranks of each rank's mean gradient over
    its own kept samples, whatever the ranks' kept counts."""
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
            g /= dist.get_world_size()
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
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, len(y))
        kept_counts.append(counts)
        if step == 12:
            break
    return {"worst": worst, "kept_counts": kept_counts}


@rank_worker(expected=(ValueError, "value-error"))
def mismatched_config(rank: int) -> None:
    """Rank 1 uses another seed: both ranks must raise, not hang."""
    sampler = AdaptiveBatchSampler(
        _data(), policy=EDBA(), batch_size=24, min_batch_size=6, seed=rank
    )
    next(iter(sampler))


def _skipping(rank: int, *, bypass: bool) -> None:
    """Rank 1 trains without reporting feedback: every rank must raise, naming rank 1."""
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


@rank_worker(expected=(AdaptiveBatchError, "adaptive-batch-error"))
def skipped_feedback(rank: int) -> None:
    _skipping(rank, bypass=False)


@rank_worker(expected=(AdaptiveBatchError, "adaptive-batch-error"))
def bypassed_feedback(rank: int) -> None:
    _skipping(rank, bypass=True)


@rank_worker
def planned_training(rank: int) -> object:
    """InfoBatch on two ranks, fed by the training step: tables, plans and step counts agree."""
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
        report["steps"].append(steps)
        report["plans"].append(sampler.order.digest(epoch))
        report["tables"].append(table_digest(sampler.ledger))
        report["drawn"].append(drawn)
        report.setdefault("planned", []).append(int(sampler.order.decide(epoch).drawn.sum()))
    return report


def _gns_pipeline():
    """A DDP-wrapped MLP, GNS resizing its batches from the training step: (ddp, optimizer,
    sampler, stage), built alike on every rank and for every run."""
    from adaptive_batch.policies import GradientNoiseScale

    torch.manual_seed(0)
    ddp = DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)))
    data = _data()
    sampler = AdaptiveBatchSampler(
        data, policy=GradientNoiseScale(), batch_size=8, min_batch_size=4, max_batch_size=40
    )
    batches = StepFeedback(DataLoader(data, batch_sampler=sampler), ddp, sampler=sampler)
    return ddp, torch.optim.SGD(ddp.parameters(), lr=0.05), sampler, batches


@rank_worker
def counted_collectives(rank: int) -> object:
    """GNS sizing fed by the training step on two ranks, counting the sampler's collectives: one
    tensor gather per step, pickling only once per epoch (the pass's start)."""
    counts = {"all_gather": 0, "all_gather_object": 0}
    for name in counts:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    ddp, optimizer, sampler, batches = _gns_pipeline()
    report = {"steps": [], "sizes": [], "gathers": [], "objects": [], "tables": []}
    for _ in range(3):
        before = dict(counts)
        steps = 0
        for x, y in batches:
            report["sizes"].append(len(y))
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            steps += 1
        batches.flush()
        report["steps"].append(steps)
        report["gathers"].append(counts["all_gather"] - before["all_gather"])
        report["objects"].append(counts["all_gather_object"] - before["all_gather_object"])
    state = sampler.state_dict()  # waits for what is in flight
    ledger = sampler.ledger
    report["tables"] = table_digest(ledger)
    report["candidates"] = ledger.num_candidates
    report["sizer"] = repr(state["sizer"])
    return report


@rank_worker
def unframeable_feedback(rank: int) -> object:
    """Feedback the frames cannot carry (statistics named differently on each rank, a reason of
    the user's own, more candidates than a batch holds) is swapped as objects, nothing lost."""
    from adaptive_batch import Feedback

    sampler = AdaptiveBatchSampler(
        40, batch_size=4, min_batch_size=2, max_batch_size=4, shuffle=False
    )
    sampler.register_reporter(object())
    held: list[int] = []
    for step, batch in enumerate(sampler):
        if step == 2:  # reported with the next one: 8 candidates, more than a frame holds
            held = batch
            continue
        kept = torch.tensor(held + batch)
        held = []
        stats = {f"rank{rank}": 1.0} if step % 3 == 0 else {"loss": float(step)}
        reason = "mine" if step % 3 == 1 else "keep_all"
        losses = kept.double() / 100
        sampler.feedback(Feedback(kept, torch.empty(0, dtype=torch.long), reason, stats, losses))
    sampler.state_dict()
    ledger = sampler.ledger
    report = {
        "candidates": ledger.num_candidates,
        "kept": ledger.times_kept.tolist(),
        "losses": ledger.losses.tolist(),
    }
    return report


@rank_worker
def resumed_mid_epoch(rank: int) -> object:
    """GNS fed by the training step on two ranks, checkpointed mid-epoch: the resumed run draws
    the same batches at the same sizes as the uninterrupted one (the feedback still on its way
    between the ranks when the checkpoint was taken is part of it)."""
    import copy

    def train(ddp, optimizer, batches, log, stop=None):
        for x, y in batches:
            log.append(batches.current_indices.tolist())
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            if len(log) == stop:
                return True
        return False

    ddp, optimizer, sampler, batches = _gns_pipeline()
    expected: list = []
    for _ in range(2):
        train(ddp, optimizer, batches, expected)
    ddp, optimizer, sampler, batches = _gns_pipeline()
    log: list = []
    train(ddp, optimizer, batches, log, stop=7)
    state = copy.deepcopy(
        {
            "model": ddp.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(),
            "stage": batches.state_dict(),
        }
    )
    in_transit = len(state["sampler"]["in_transit"])
    ddp, optimizer, sampler, batches = _gns_pipeline()
    ddp.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    sampler.load_state_dict(state["sampler"])
    batches.load_state_dict(state["stage"])
    while len(log) < len(expected):
        train(ddp, optimizer, batches, log)
    report = {
        "same": log == expected,
        "sizes": sorted({len(b) for b in expected}),
        "in_transit": in_transit,
    }
    return report
