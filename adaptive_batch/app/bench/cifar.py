"""CIFAR-10 for the benchmarks: decoded once, cached, augmented on the fly.

The data location is an argument: the ``cifar10-jpg.tar.gz`` archive or its extracted folder
(``cifar10-jpg/{train,test}/<class>/<NNNN>.jpg``, the ``ImageFolder`` layout). The 60,000 JPEGs are
decoded once into a uint8 tensor file in the cache folder. Without data, ``synthetic_cifar`` gives
a small random stand-in of the same shapes, for smoke tests only.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from adaptive_batch.optional import require

__all__ = [
    "AugmentedImages",
    "CifarData",
    "evaluate",
    "load_cifar10",
    "stratified_subset",
    "synthetic_cifar",
]

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@dataclass
class CifarData:
    train_x: Tensor  # uint8 [N, 3, 32, 32]
    train_y: Tensor  # long [N]
    test_x: Tensor
    test_y: Tensor
    source: str  # where it came from, for the report


def _decode(data: bytes) -> Tensor:
    image = require("PIL.Image", "vision", "decoding CIFAR-10 JPEGs")
    with image.open(io.BytesIO(data)) as picture:
        array = torch.frombuffer(bytearray(picture.convert("RGB").tobytes()), dtype=torch.uint8)
    return array.view(32, 32, 3).permute(2, 0, 1).clone()


def _files(location: Path) -> list[tuple[str, bytes]]:
    """``(relative path, bytes)`` of every JPEG, from the archive or the folder."""
    if location.is_dir():
        return [(str(p.relative_to(location)), p.read_bytes()) for p in location.rglob("*.jpg")]
    with tarfile.open(location) as archive:
        return [
            (m.name, archive.extractfile(m).read())  # type: ignore[union-attr]
            for m in archive.getmembers()
            if m.isfile() and m.name.endswith(".jpg")
        ]


def load_cifar10(location: str | Path, cache_dir: str | Path) -> CifarData:
    """CIFAR-10 from ``location`` (archive or folder), through a uint8 cache in ``cache_dir``."""
    location = Path(location)
    if not location.exists():
        raise FileNotFoundError(
            f"no CIFAR-10 at {location}: give the cifar10-jpg.tar.gz archive or its folder"
        )
    stat = location.stat()
    key = hashlib.sha1(
        f"{location.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:12]
    cache = Path(cache_dir) / f"cifar10-{key}.pt"
    if cache.exists():
        tensors = torch.load(cache)
    else:
        files = [
            (Path(name).parts[-3], Path(name).parts[-2], data)
            for name, data in sorted(_files(location))
            if len(Path(name).parts) >= 3
        ]
        # Labels follow the sorted class folder names, as ImageFolder numbers them.
        classes = sorted({label for split, label, _ in files if split == "train"})
        splits: dict[str, tuple[list[Tensor], list[int]]] = {"train": ([], []), "test": ([], [])}
        for split, label, data in files:
            if split in splits and label in classes:
                splits[split][0].append(_decode(data))
                splits[split][1].append(classes.index(label))
        empty = [s for s, (images, _) in splits.items() if not images]
        if empty:
            raise ValueError(
                f"{location} has no JPEGs under {' or '.join(empty)}/<class>/: expected the "
                "ImageFolder layout <root>/{train,test}/<class>/*.jpg"
            )
        tensors = {
            f"{s}_{k}": v
            for s, (images, labels) in splits.items()
            for k, v in (("x", torch.stack(images)), ("y", torch.tensor(labels)))
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, cache)
    return CifarData(source=str(location), **tensors)


def synthetic_cifar(train: int = 2000, test: int = 500, seed: int = 0) -> CifarData:
    """Random CIFAR-shaped images with learnable class structure: a stand-in for smoke tests."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(10, 3, 32, 32, generator=gen) * 255

    def make(count: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(count) % 10
        noise = torch.randn(count, 3, 32, 32, generator=gen) * 60
        return (prototypes[labels] + noise).clamp(0, 255).to(torch.uint8), labels

    (train_x, train_y), (test_x, test_y) = make(train), make(test)
    return CifarData(
        train_x, train_y, test_x, test_y, source=f"synthetic ({train} train, {test} test)"
    )


def _normalise(images: Tensor) -> Tensor:
    mean = torch.tensor(MEAN, device=images.device).view(-1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(-1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


class AugmentedImages(Dataset):
    """``(image, label)`` with random crop (4 pixels of zero padding) and horizontal flip, drawn
    from a seeded generator (the EDBA paper's augmentations)."""

    def __init__(
        self, images: Tensor, labels: Tensor, *, augment: bool = True, seed: int = 0
    ) -> None:
        self.images = images
        self.labels = labels
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.augment:
            dx, dy, flip = torch.randint(0, 9, (3,), generator=self.generator).tolist()
            padded = nn.functional.pad(image, (4, 4, 4, 4))
            image = padded[:, dy : dy + 32, dx : dx + 32]
            if flip % 2:
                image = image.flip(-1)
        return _normalise(image)[0], self.labels[index]


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, *, batch: int = 1000) -> float:
    """Top-1 accuracy, in eval mode, on the model's device."""
    device = next(model.parameters()).device
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    with torch.no_grad():
        for start in range(0, labels.numel(), batch):
            x = _normalise(images[start : start + batch].to(device, non_blocking=True))
            y = labels[start : start + batch].to(device, non_blocking=True)
            correct += (model(x).argmax(dim=1) == y).sum()
    return int(correct) / labels.numel()  # one host sync per evaluation


def stratified_subset(labels: Tensor, count: int, seed: int) -> Tensor:
    """``count`` indices with the classes as equal as possible (seeded), sorted.

    Example:
        >>> import torch
        >>> idx = stratified_subset(torch.arange(100) % 10, 20, seed=0)
        >>> torch.bincount(torch.arange(100)[idx] % 10).tolist()
        [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    """
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [labels.eq(c).nonzero().flatten() for c in classes]
    shuffled = [members[torch.randperm(members.numel(), generator=gen)] for members in per_class]
    base, extra = divmod(count, len(classes))
    order = torch.randperm(len(classes), generator=gen).tolist()
    chosen = [shuffled[c][: base + (1 if rank < extra else 0)] for rank, c in enumerate(order)]
    return torch.cat(chosen).sort().values
