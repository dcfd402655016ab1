"""A torchdata.nodes pipeline with SubsetFilterNode: threaded fetching, prefetching, and a
checkpoint taken mid-epoch that resumes exactly.

    python examples/torchdata_nodes.py --epochs 3

Trains the demo's MLP on scikit-learn's digits. The sampler is chunked (``chunk_size``) so batch
sizes are applied where batches are consumed: the prefetcher never runs ahead of the feedback,
and the Loader's ``state_dict()`` resumes with exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import argparse
import copy
import gc
from functools import partial

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.nodes import Loader, ParallelMapper, Prefetcher, SamplerWrapper

from adaptive_batch import AdaptiveBatchSampler, IndexedDataset, fetch_batch
from adaptive_batch.nodes import SubsetFilterNode
from adaptive_batch.policies import EDBA


def load_digits_split(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits scaled to [0, 1]: a stratified 75/25 train/test split."""
    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features / 16.0, labels, test_size=0.25, stratify=labels, random_state=seed
    )
    return tuple(  # type: ignore[return-value]
        TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
        for x, y in ((x_train, y_train), (x_test, y_test))
    )


def make_model() -> nn.Module:
    """An MLP: 64 pixels, one hidden layer of 128, 10 classes."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        return (model(x).argmax(dim=1) == y).float().mean().item()


def build(train, seed: int):
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    data = IndexedDataset(train)
    sampler = AdaptiveBatchSampler(
        data, policy=EDBA(seed=seed), batch_size=96, min_batch_size=16, chunk_size=16, seed=seed
    )
    chunks = ParallelMapper(
        SamplerWrapper(sampler), partial(fetch_batch, data), num_workers=2, method="thread"
    )
    loader = Loader(SubsetFilterNode(Prefetcher(chunks, prefetch_factor=4), model, sampler=sampler))
    return model, optimizer, loader


def train_steps(model, optimizer, loader, steps: int, log: list) -> None:
    iterator = iter(loader)
    for _ in range(steps):
        try:
            x, y = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            x, y = next(iterator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log.append(len(y))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3, help="passes over the data (3)")
    parser.add_argument("--seed", type=int, default=0, help="model, data and policy seed (0)")
    args = parser.parse_args()
    train, test = load_digits_split(args.seed)

    model, optimizer, loader = build(train, args.seed)
    for epoch in range(args.epochs):
        sizes = []
        for x, y in loader:  # an unmodified loop over the Loader
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sizes.append(len(y))
        print(
            f"epoch {epoch}: {len(sizes)} steps, mean batch {sum(sizes) / len(sizes):.0f}, test accuracy {100 * accuracy(model, test):.2f}%"
        )

    # Checkpoint after 7 steps of a fresh run, resume in new objects, and compare with 14 steps.
    reference: list[int] = []
    train_steps(*build(train, args.seed), 14, reference)
    first: list[int] = []
    model, optimizer, loader = build(train, args.seed)
    train_steps(model, optimizer, loader, 7, first)
    checkpoint = copy.deepcopy(
        {
            "loader": loader.state_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        }
    )
    model, optimizer, loader = build(train, args.seed)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    loader.load_state_dict(checkpoint["loader"])
    second: list[int] = []
    train_steps(model, optimizer, loader, 7, second)
    same = first + second == reference
    print(
        f"resumed from a mid-run checkpoint: batch sizes {'match' if same else 'DIFFER FROM'} the uninterrupted run"
    )
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    try:
        main()
    finally:
        # A torchdata Loader left mid-epoch sits in a reference cycle with its iterator, so its
        # worker threads stop only when the garbage collector runs: collect now, before the
        # interpreter exits with threads still inside torch (which can abort the process).
        gc.collect()
