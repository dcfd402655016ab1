"""Random candidate subsets of a batch, drawn on the CPU so a seed gives the same draw on any device."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import AdaptiveBatchError

__all__ = ["random_subset_masks"]


def random_subset_masks(
    batch_size: int, num_subsets: int, min_kept: int, generator: torch.Generator
) -> Tensor:
    """``[num_subsets, batch_size]`` boolean masks of uniformly random subsets.

    Each subset's size is drawn uniformly from ``[min_kept, batch_size]``; given its size, the
    subset is uniform among subsets of that size.

    Example:
        >>> import torch
        >>> masks = random_subset_masks(5, 3, 2, torch.Generator().manual_seed(0))
        >>> masks.shape, bool((masks.sum(1) >= 2).all())
        (torch.Size([3, 5]), True)
    """
    if not 1 <= min_kept <= batch_size:
        raise AdaptiveBatchError(
            f"need 1 <= min_kept <= batch_size; got {min_kept} and {batch_size}"
        )
    if num_subsets < 1:
        raise AdaptiveBatchError(f"num_subsets must be positive; got {num_subsets}")
    sizes = torch.randint(min_kept, batch_size + 1, (num_subsets, 1), generator=generator)
    ranks = torch.rand(num_subsets, batch_size, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < sizes
