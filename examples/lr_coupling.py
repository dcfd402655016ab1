"""The learning rate following the batch size, with a standard scheduler.

    python examples/lr_coupling.py --epochs 20

Two runs on scikit-learn's digits: the gradient noise scale picks the batch size and AdaScale's
gain scales the learning rate (AdaptDL's pairing); then GeoDamp doubles the batch every 5 epochs
and, past the largest batch, lowers the learning rate instead (Sievert & Shah's rule). The
optimizer is untouched: ``BatchSizeLR`` is an ordinary ``torch.optim.lr_scheduler``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from adaptive_batch import AdaptiveBatchSampler, BatchSizeLR, IndexedDataset, SubsetFilter
from adaptive_batch.app.demo import accuracy, load_digits_split, make_model
from adaptive_batch.policies import GeoDamp, GradientNoiseScale


def run(name: str, policy, rule: str, epochs: int, seed: int, **caps) -> None:
    train, test, _ = load_digits_split(seed, 1.0)
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = AdaptiveBatchSampler(train, policy=policy, seed=seed, **caps)
    scheduler = BatchSizeLR(optimizer, sampler, rule)
    batches = SubsetFilter(
        DataLoader(IndexedDataset(train), batch_sampler=sampler), model, sampler=sampler
    )
    for epoch in range(epochs):
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()  # after optimizer.step(), as with any scheduler
        if epoch % max(1, epochs // 4) == 0 or epoch == epochs - 1:
            print(
                f"{name} epoch {epoch:>2}: batch {sampler.batch_size:>4} (asked {sampler.requested_batch_size:>7.0f}), "
                f"lr {scheduler.get_last_lr()[0]:.4f}, test accuracy {100 * accuracy(model, test):.2f}%"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run(
        "noise scale + AdaScale",
        GradientNoiseScale(),
        "adascale",
        args.epochs,
        args.seed,
        batch_size=32,
        max_batch_size=512,
    )
    run(
        "GeoDamp + damping",
        GeoDamp(factor=2, delay=5),
        "damp",
        args.epochs,
        args.seed,
        batch_size=64,
        max_batch_size=256,
    )


if __name__ == "__main__":
    main()
