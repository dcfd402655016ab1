"""Adaptive batches under DistributedDataParallel, launched with torchrun.

    torchrun --nproc_per_node=2 examples/ddp_train.py              # CPU (gloo) or GPUs (NCCL)

Every rank builds the same sampler (same seed); it shards each epoch's permutation so ranks draw
disjoint indices, and gathers every step's feedback so that all ranks pick the same next batch
size and run the same number of steps. The filter probes the unwrapped module, so the probe's
forward starts no DDP collectives. ``--report PREFIX`` writes ``PREFIX-<rank>.json`` with what
each rank saw (the test suite checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from adaptive_batch import AdaptiveBatchSampler, IndexedDataset, SubsetFilter
from adaptive_batch.policies import EDBA


def blobs(num: int, classes: int = 4, dim: int = 16, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % classes
    centres = torch.randn(classes, dim, generator=gen) * 2
    return TensorDataset(centres[labels] + torch.randn(num, dim, generator=gen), labels)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=2, help="passes over the data (2)")
    parser.add_argument("--samples", type=int, default=1024, help="synthetic samples (1024)")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="size batches where they are consumed"
    )
    parser.add_argument("--report", default=None, help="write PREFIX-<rank>.json per rank")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        sys.exit(
            "ddp_train.py runs one process per rank: launch it with torchrun, e.g.\n"
            "    torchrun --nproc_per_node=2 examples/ddp_train.py"
        )

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        report = train(args, device, device_ids=[local_rank] if cuda else None)
        if args.report:
            with open(f"{args.report}-{report['rank']}.json", "w") as f:
                json.dump(report, f)
        # Every rank is past its last collective before any rank closes its connections.
        dist.barrier()
    finally:
        # On every path, and after train() has dropped the group's users (DDP, loader, filter).
        dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device, device_ids: list[int] | None) -> dict:
    """Train with DDP + sampler + filter; return what this rank saw."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    data = IndexedDataset(blobs(args.samples))
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)
    ddp = DistributedDataParallel(model, device_ids=device_ids)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

    sampler = AdaptiveBatchSampler(
        data,
        policy=EDBA(seed=0),
        batch_size=32,
        min_batch_size=8,
        max_batch_size=128,
        seed=0,
        chunk_size=args.chunk_size,
    )
    loader = DataLoader(data, batch_sampler=sampler, pin_memory=device.type == "cuda")
    batches = SubsetFilter(loader, model, sampler=sampler)

    sizes, kept, seen = [], [], []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        epoch_seen: list[int] = []
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            feedback = batches.last_feedback
            sizes.append(feedback.batch_size)
            kept.append(feedback.num_kept)
            epoch_seen += feedback.kept.tolist() + feedback.dropped.tolist()
        seen.append(epoch_seen)
        if rank == 0:
            print(
                f"epoch {epoch}: {len(epoch_seen)} candidates per rank in {len(sizes)} steps "
                f"so far, last loss {loss.item():.3f}"
            )
    return {"rank": rank, "world": world, "sizes": sizes, "kept": kept, "seen": seen}


if __name__ == "__main__":
    main()
    # DDP keeps the gloo backend's worker threads alive past destroy_process_group() (torch
    # 2.14.1), and one of them can still be releasing a tensor of the last collective while Python
    # shuts down, which aborts the process (3 launches in 75 here; see docs/scaling.md). Nothing
    # is left to clean up, so leave without the interpreter's shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
