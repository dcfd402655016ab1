"""Adaptive batches with Hugging Face Accelerate, on one process or several, CPU or GPU.

    python examples/accelerate_train.py                                  # one process
    torchrun --nproc_per_node=2 examples/accelerate_train.py --cpu       # two processes, gloo
    accelerate launch --num_processes 2 examples/accelerate_train.py     # with an accelerate config

The loader goes through Accelerate's own preparation (device placement, the end-of-data flag that
``accelerator.accumulate`` reads) with ``prepare_loader``, not ``accelerator.prepare``, which would
re-shard the sampler's batches with its ``BatchSamplerShard``: the sampler shards its index set by
rank itself and keeps every rank's batch size equal. The training-step stage reports each batch's
losses from the loop's own forward, the epoch plan (InfoBatch) prunes from them, and the loop is
Accelerate's usual one. ``--report PREFIX`` writes ``PREFIX-<rank>.json`` with what each process
trained on, per epoch (the test suite checks it). ``--save DIR`` trains one epoch and saves the state with
``accelerator.save_state``; ``--resume DIR`` loads it and trains the remaining epochs: the two
together train on exactly the batches of one uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive_batch import AdaptiveBatchSampler, IndexedDataset, StepFeedback
from adaptive_batch.integrations.accelerate import prepare_loader
from adaptive_batch.policies import GradientNoiseScale, InfoBatch, Policy


def blobs(num: int, classes: int = 4, dim: int = 16, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % classes
    centres = torch.randn(classes, dim, generator=gen) * 2
    return TensorDataset(centres[labels] + torch.randn(num, dim, generator=gen), labels)


def build(accelerator: Accelerator, args: argparse.Namespace):
    """Model, optimizer, sampler and stage, built the same way on every process."""
    torch.manual_seed(0)  # the same initial weights everywhere
    data = IndexedDataset(blobs(args.samples))
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # The policy that pays: InfoBatch's epoch plan; the gradient noise scale sizes the batches
    # from the same free feedback. Built after Accelerator(): it shards by the process group.
    policy = Policy(sizing=GradientNoiseScale(), plan=InfoBatch(num_epochs=args.epochs))
    sampler = AdaptiveBatchSampler(
        data, policy=policy, batch_size=16, min_batch_size=8, max_batch_size=128, seed=0
    )
    loader = prepare_loader(accelerator, DataLoader(data, batch_sampler=sampler))
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = StepFeedback(loader, model, sampler=sampler)
    accelerator.register_for_checkpointing(sampler)  # the state is the same on every process
    return model, optimizer, sampler, batches


def train_epochs(accelerator, model, optimizer, batches, epochs, log) -> None:
    # InfoBatch's weights keep the pruned epochs' expected gradient unbiased.
    criterion = batches.weighted(lambda out, y: F.cross_entropy(out, y, reduction="none"))
    for _ in range(epochs):
        log.append([])  # the dataset indices of each batch this process trained on, per epoch
        for x, y in batches:
            with accelerator.accumulate(model):
                loss = criterion(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            log[-1].append(batches.current_indices.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3, help="passes over the data (3)")
    parser.add_argument("--samples", type=int, default=1024, help="synthetic samples (1024)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    parser.add_argument("--report", default=None, help="write PREFIX-<rank>.json")
    parser.add_argument("--save", default=None, help="train one epoch, then save_state() here")
    parser.add_argument("--resume", default=None, help="load_state() from here, train the rest")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=args.cpu)
    model, optimizer, sampler, batches = build(accelerator, args)
    epochs = args.epochs
    if args.save:
        epochs = 1
    if args.resume:
        accelerator.load_state(args.resume)  # the sampler too: registered
        epochs = args.epochs - sampler.next_epoch
    trained: list[list[list[int]]] = []
    train_epochs(accelerator, model, optimizer, batches, epochs, trained)
    if args.save:
        accelerator.save_state(args.save)
    accelerator.print(
        f"{accelerator.num_processes} process(es), {sum(map(len, trained))} steps each, "
        f"{batches.num_candidates} samples on process 0, batch size now {sampler.batch_size}"
    )
    if args.report:
        with open(f"{args.report}-{accelerator.process_index}.json", "w") as f:
            json.dump({"world": accelerator.num_processes, "trained": trained}, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # As in ddp_train.py: gloo's worker threads can abort the interpreter's shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
