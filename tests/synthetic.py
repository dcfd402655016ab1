"""Synthetic classification data for the tests: Gaussian blobs around random class centres."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def blobs(
    num: int, *, classes: int = 3, dim: int = 8, spread: float = 2.0, seed: int = 0
) -> TensorDataset:
    """``num`` samples, labels cycling through ``classes``, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % classes
    centres = torch.randn(classes, dim, generator=gen) * spread
    return TensorDataset(centres[labels] + torch.randn(num, dim, generator=gen), labels)
