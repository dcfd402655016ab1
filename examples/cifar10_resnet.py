"""CIFAR-10 with a small ResNet: DataLoader + AdaptiveBatchSampler + SubsetFilter around an
unmodified SGD loop.

    python examples/cifar10_resnet.py --data ../shared/data/cifar10-jpg.tar.gz --epochs 5

``--data`` is the ``cifar10-jpg.tar.gz`` archive (extracted once into ``--cache``, by default the
user cache folder ``~/.cache/adaptive_batch``, never the working tree) or a folder in the
``ImageFolder`` layout (``<root>/{train,test}/<class>/*.jpg``). ``--subset N`` trains on a
stratified subset of N images; the sampler guarantees no other image is ever drawn.
"""

from __future__ import annotations

import argparse
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from tqdm import tqdm

from adaptive_batch import AdaptiveBatchSampler, IndexedDataset, SubsetFilter
from adaptive_batch.app.bench.cifar import stratified_subset
from adaptive_batch.app.bench.models import cifar_resnet
from adaptive_batch.app.paths import user_cache_dir
from adaptive_batch.app.recipes import POLICY_NAMES, recipe

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


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
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument(
        "--cache",
        type=Path,
        default=user_cache_dir(),
        help="where the archive is extracted (default: %(default)s)",
    )
    parser.add_argument("--policy", default="edba", choices=POLICY_NAMES)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--subset", type=int, default=None, help="train on N stratified images")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None, help="size batches where consumed")
    parser.add_argument("--seed", type=int, default=0)
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
    allowed = stratified_subset(labels, args.subset, args.seed) if args.subset else None

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    model = cifar_resnet(8).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )

    # The only lines that differ from a plain training script: the sampler, the wrapped dataset,
    # and the filter around the loader.
    r = recipe(
        args.policy,
        seed=args.seed,
        lr=0.05,
        total_candidates=args.epochs * (args.subset or len(train_set)),
    )
    sampler = AdaptiveBatchSampler(
        train_set,
        policy=r.policy,
        indices=allowed,
        seed=args.seed,
        chunk_size=args.chunk_size,
        **r.sampler_kwargs(),
    )
    loader = DataLoader(IndexedDataset(train_set), batch_sampler=sampler, num_workers=args.workers)
    batches = SubsetFilter(loader, model, sampler=sampler)
    test_loader = DataLoader(test_set, batch_size=500, num_workers=args.workers)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for x, y in tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
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
            f"{sampler.batch_size}, kept {batches.num_trained}/{batches.num_candidates} candidates, "
            f"{time.perf_counter() - start:.0f} s"
        )


if __name__ == "__main__":
    main()
