"""Reading fields from a collated batch and keeping a subset of it in the same structure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import AdaptiveBatchKeyError

__all__ = ["concat", "get_field", "take"]


def get_field(batch: Any, key: int | str) -> Any:
    """``batch[key]`` for a tuple/list (int key) or a mapping (str key), with a clear error."""
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError):
        raise AdaptiveBatchKeyError(
            f"the batch ({type(batch).__name__}) has no field {key!r}; tell the stage where the "
            "model's inputs and targets are with inputs=... and targets=... (StepFeedback takes "
            "targets= alone): a position in a tuple or list, a key in a dict"
        ) from None


def _is_container(value: Any) -> bool:
    return isinstance(value, Tensor | Mapping | list | tuple)


def take(batch: Any, positions: Tensor, batch_size: int) -> Any:
    """Keep ``positions`` (a CPU ``long`` tensor) of every per-sample field of ``batch``.

    Structure is kept: tuples, lists, namedtuples and mappings are rebuilt with the same type.
    Per-sample fields are tensors whose first dimension is ``batch_size`` and lists or tuples of
    ``batch_size`` plain values (e.g. the file names ``default_collate`` leaves as a list).
    Everything else is carried along unchanged.

    Example:
        >>> import torch
        >>> batch = {"x": torch.arange(6).view(3, 2), "name": ["a", "b", "c"], "lr": 0.1}
        >>> take(batch, torch.tensor([0, 2]), 3)
        {'x': tensor([[0, 1],
                [4, 5]]), 'name': ['a', 'c'], 'lr': 0.1}
    """
    on_device: dict[torch.device, Tensor] = {positions.device: positions}

    def positions_on(device: torch.device) -> Tensor:
        if device not in on_device:
            on_device[device] = positions.to(device, non_blocking=True)
        return on_device[device]

    def visit(value: Any) -> Any:
        if isinstance(value, Tensor):
            if value.dim() >= 1 and value.shape[0] == batch_size:
                return value.index_select(0, positions_on(value.device))
            return value
        if isinstance(value, Mapping):
            items = {k: visit(v) for k, v in value.items()}
            try:
                return type(value)(items)
            except TypeError:
                return items
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*(visit(v) for v in value))
        if isinstance(value, list | tuple):
            if any(_is_container(v) for v in value):
                return type(value)(visit(v) for v in value)
            if len(value) == batch_size:
                return type(value)(value[i] for i in positions.tolist())
        return value

    return visit(batch)


def concat(parts: list[Any], lengths: list[int]) -> Any:
    """Join collated batches of ``lengths`` samples into one, in the structure of the first.

    Per-sample fields (the same rule as :func:`take`) are concatenated; anything else is taken
    from the first part.

    Example:
        >>> import torch
        >>> a = {"x": torch.zeros(2, 3), "name": ["a", "b"], "lr": 0.1}
        >>> b = {"x": torch.ones(1, 3), "name": ["c"], "lr": 0.1}
        >>> joined = concat([a, b], [2, 1])
        >>> joined["x"].shape, joined["name"], joined["lr"]
        (torch.Size([3, 3]), ['a', 'b', 'c'], 0.1)
    """
    first = parts[0]
    if isinstance(first, Tensor):
        per_sample = all(
            isinstance(p, Tensor) and p.dim() >= 1 and p.shape[0] == n
            for p, n in zip(parts, lengths, strict=True)
        )
        return torch.cat(parts) if per_sample else first
    if isinstance(first, Mapping):
        items = {k: concat([p[k] for p in parts], lengths) for k in first}
        try:
            return type(first)(items)
        except TypeError:
            return items
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(concat(list(column), lengths) for column in zip(*parts, strict=True)))
    if isinstance(first, list | tuple):
        if any(_is_container(v) for v in first):
            return type(first)(concat(list(column), lengths) for column in zip(*parts, strict=True))
        if all(len(p) == n for p, n in zip(parts, lengths, strict=True)):
            return type(first)(v for p in parts for v in p)
    return first
