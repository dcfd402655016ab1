"""CIFAR-10 with a small residual network: DataLoader + AdaptiveBatchSampler + a stage (a
SubsetFilter, or StepFeedback) around an unmodified SGD loop. It uses the public API only: copy
it as a template.

    python examples/cifar10_resnet.py --data ../shared/data/cifar10-jpg.tar.gz --epochs 5

``--data`` is the ``cifar10-jpg.tar.gz`` archive (extracted once into ``--cache``, by default the
user cache folder ``~/.cache/adaptive_batch``, never the working tree) or a folder in the
``ImageFolder`` layout (``<root>/{train,test}/<class>/*.jpg``). ``--subset N`` trains on a
class-balanced subset of N images; the sampler guarantees no other image is ever drawn.
``--policy``: ``edba`` (EDBA: look-ahead selection and a growing batch, in a SubsetFilter),
``selective-backprop`` (look-ahead, SubsetFilter) or ``infobatch`` (an epoch plan fed by the
training step itself, StepFeedback, its weights through ``batches.weighted``).
"""

from __future__ import annotations

import argparse
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from tqdm import tqdm

from adaptive_batch import AdaptiveBatchSampler, IndexedDataset, StepFeedback, SubsetFilter
from adaptive_batch.policies import EDBA, InfoBatch, SelectiveBackprop

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
POLICIES = ("edba", "selective-backprop", "infobatch")


class Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (strided 1x1 when the shape changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False),
            nn.BatchNorm2d(outputs),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and inputs == outputs
            else nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def small_resnet(classes: int = 10) -> nn.Module:
    """A ResNet-8: a stem and three stages of one block (16, 32, 64 channels), a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Block(16, 16, 1),
        Block(16, 32, 2),
        Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, classes),
    )


def balanced_subset(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` indices, as many of each class as can be (the first of a seeded shuffle)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(labels.numel(), generator=generator)
    rank_in_class = torch.zeros_like(order)
    for label in labels.unique():
        members = order[labels[order] == label]
        rank_in_class[members] = torch.arange(members.numel())
    # Round-robin over the classes: each class's first, then each class's second, ...
    return order[torch.argsort(rank_in_class[order], stable=True)[:count]].sort().values


def build_policy(name: str, epochs: int, seed: int, candidates: int):
    """The policy, its sampler settings, and whether it is fed by the training step."""
    if name == "edba":
        return (
            EDBA(seed=seed),
            {"batch_size": 100, "min_batch_size": 10, "max_batch_size": 1000},
            False,
        )
    fixed = {"batch_size": 128, "min_batch_size": 128, "max_batch_size": 128}
    if name == "selective-backprop":
        return SelectiveBackprop(keep=0.5, total_candidates=candidates, seed=seed), fixed, False
    return InfoBatch(num_epochs=epochs), fixed, True


def image_root(data: Path, cache: Path) -> Path:
    """The folder holding ``train/`` and ``test/``, extracting the archive once if needed."""
    if data.is_dir():
        return data if (data / "train").is_dir() else data / "cifar10-jpg"
    target = cache / "cifar10-jpg"
    if not (target / "train").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(data) as archive:
            # The "data" filter refuses unsafe paths; older Pythons lack the argument.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(cache, **safe)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="cifar10-jpg.tar.gz or its extracted folder"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "adaptive_batch",
        help="where the archive is extracted (default: %(default)s)",
    )
    parser.add_argument("--policy", default="edba", choices=POLICIES, help="(default: edba)")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the data (5)")
    parser.add_argument("--subset", type=int, default=None, help="train on N class-balanced images")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (2)")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="size batches where they are consumed"
    )
    parser.add_argument("--seed", type=int, default=0, help="model, order and policy seed (0)")
    args = parser.parse_args()

    root = image_root(args.data, args.cache)
    normalise = transforms.Normalize(MEAN, STD)
    train_set = datasets.ImageFolder(
        root / "train",
        transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalise,
            ]
        ),
    )
    test_set = datasets.ImageFolder(
        root / "test", transforms.Compose([transforms.ToTensor(), normalise])
    )
    labels = torch.tensor(train_set.targets)
    allowed = balanced_subset(labels, args.subset, args.seed) if args.subset else None

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    model = small_resnet().to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )

    # The only lines that differ from a plain training script: the sampler, the wrapped dataset,
    # the stage around the loader (and, for an epoch plan that weighs samples, the loss).
    candidates = args.epochs * (args.subset or len(train_set))
    policy, sizes, from_step = build_policy(args.policy, args.epochs, args.seed, candidates)
    sampler = AdaptiveBatchSampler(
        train_set,
        policy=policy,
        indices=allowed,
        seed=args.seed,
        chunk_size=args.chunk_size,
        **sizes,
    )
    loader = DataLoader(IndexedDataset(train_set), batch_sampler=sampler, num_workers=args.workers)
    if from_step:
        batches = StepFeedback(loader, model, sampler=sampler)
        loss_fn = batches.weighted(lambda out, y: F.cross_entropy(out, y, reduction="none"))
    else:
        batches = SubsetFilter(loader, model, sampler=sampler)
        loss_fn = F.cross_entropy
    test_loader = DataLoader(test_set, batch_size=500, num_workers=args.workers)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for x, y in tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            correct = sum(
                int((model(x.to(device)).argmax(1).cpu() == y).sum()) for x, y in test_loader
            )
        print(
            f"epoch {epoch}: test accuracy {100 * correct / len(test_set):.2f}%, batch size now "
            f"{sampler.batch_size}, kept {sampler.num_kept}/{sampler.num_candidates} candidates, "
            f"{time.perf_counter() - start:.0f} s"
        )


if __name__ == "__main__":
    main()
