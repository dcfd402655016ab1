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
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive_batch import AdaptiveBatchSampler, BatchSizeLR, IndexedDataset, SubsetFilter
from adaptive_batch.policies import GeoDamp, GradientNoiseScale


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


def run(name: str, policy, rule: str, epochs: int, seed: int, **caps) -> None:
    train, test = load_digits_split(seed)
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
    parser.add_argument("--epochs", type=int, default=20, help="passes over the data (20)")
    parser.add_argument("--seed", type=int, default=0, help="model, data and policy seed (0)")
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
