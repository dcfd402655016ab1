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


def features_of(indices: list[int], *, pin: bool = False):
    """A batch computed from its dataset indices (8 features, 4 classes), so a dataset of any
    size costs no memory: an ``IndexedSample`` as an ``IndexedDataset`` loader yields it."""
    from adaptive_batch import IndexedSample

    index = torch.tensor(indices)
    x, y = torch.sin(index.float()[:, None] * torch.linspace(0.01, 1, 8)), index % 4
    return IndexedSample(index, (x.pin_memory(), y.pin_memory()) if pin else (x, y))


def steady_stage(size: int, policy, batch: int, stage: str, model):
    """A sampler of constant ``batch`` over ``size`` indices, past its first epoch (every index
    has a loss, so a plan prunes and weighs), with its stage (``"step"``: StepFeedback and its
    weighted loss of a cross-entropy given to it; ``"step-shared"``: the stage's own loss,
    ``weighted()``; ``"filter"``: SubsetFilter), and the sampler's iterator for epoch 1:
    ``(sampler, stage, loss_fn, batches of indices)``."""
    import torch.nn.functional as F

    from adaptive_batch import AdaptiveBatchSampler, StepFeedback, SubsetFilter

    sampler = AdaptiveBatchSampler(
        size, policy=policy, batch_size=batch, min_batch_size=batch, max_batch_size=batch
    )
    if stage == "step-shared":
        stage_ = StepFeedback(None, model, sampler=sampler)
        loss_fn = stage_.weighted()
    elif stage == "step":
        stage_ = StepFeedback(None, model, sampler=sampler)
        loss_fn = stage_.weighted(lambda z, y: F.cross_entropy(z, y, reduction="none"))
    else:
        stage_ = SubsetFilter(None, model, sampler=sampler)
        loss_fn = F.cross_entropy
    state = sampler.state_dict()
    state["ledger"]["losses"] = torch.rand(size)
    sampler.load_state_dict(state)
    sampler.set_epoch(1)
    return sampler, stage_, loss_fn, iter(sampler)
