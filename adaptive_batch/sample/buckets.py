"""SizeBuckets: the batch sizes a compiled model may see.

``torch.compile`` specialises a graph to each batch size it meets; a policy that moves the size
freely recompiles again and again. Rounding every size to a multiple (say 8) or to a fixed list
bounds the number of distinct shapes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from ..errors import AdaptiveBatchError

__all__ = ["SizeBuckets", "as_buckets"]


class SizeBuckets:
    """Allowed batch sizes: multiples of ``multiple``, or the listed ``sizes``.

    Example:
        >>> SizeBuckets(multiple=8).nearest(13, 1, 100), SizeBuckets(multiple=8).floor(13)
        (16, 8)
        >>> buckets = SizeBuckets(sizes=[16, 64, 256])
        >>> buckets.nearest(100, 1, 1000), buckets.nearest(100, 1, 200), buckets.floor(15)
        (64, 64, 16)
    """

    def __init__(self, *, multiple: int | None = None, sizes: Sequence[int] | None = None) -> None:
        if (multiple is None) == (sizes is None):
            raise AdaptiveBatchError("give exactly one of multiple= and sizes=")
        if multiple is not None and multiple < 1:
            raise AdaptiveBatchError(f"multiple must be at least 1; got {multiple}")
        if sizes is not None:
            sizes = sorted(set(int(s) for s in sizes))
            if not sizes or sizes[0] < 1:
                raise AdaptiveBatchError(f"sizes must be positive integers; got {sizes}")
        self.multiple = multiple
        self.sizes = sizes

    def __repr__(self) -> str:
        return (
            f"SizeBuckets(multiple={self.multiple})"
            if self.multiple
            else f"SizeBuckets(sizes={self.sizes})"
        )

    def within(self, low: int, high: int) -> list[int]:
        """The allowed sizes in ``[low, high]`` (bounded by ``high // multiple`` for multiples)."""
        if self.multiple is not None:
            first = -(-low // self.multiple) * self.multiple
            return list(range(max(first, self.multiple), high + 1, self.multiple))
        assert self.sizes is not None
        return [s for s in self.sizes if low <= s <= high]

    def nearest(self, size: float, low: int, high: int) -> int:
        """The allowed size nearest ``size`` within ``[low, high]`` (ties go up); ``size`` itself,
        rounded and clamped, when no allowed size lies in the range."""
        allowed = self.within(low, high)
        if not allowed:
            return int(min(max(round(size), low), high))
        i = bisect.bisect_left(allowed, size)
        candidates = allowed[max(i - 1, 0) : i + 1]
        return min(candidates, key=lambda s: (abs(s - size), -s))

    def floor(self, size: int) -> int:
        """The largest allowed size at most ``size``; the smallest allowed size if none is."""
        if self.multiple is not None:
            return max(self.multiple, size // self.multiple * self.multiple)
        assert self.sizes is not None
        i = bisect.bisect_right(self.sizes, size)
        return self.sizes[max(i - 1, 0)]

    def contains(self, size: int) -> bool:
        if self.multiple is not None:
            return size % self.multiple == 0
        assert self.sizes is not None
        return size in self.sizes


def as_buckets(value: SizeBuckets | int | Sequence[int] | None) -> SizeBuckets | None:
    """``buckets=`` as the sampler and the filter take it: a :class:`SizeBuckets`, an int (its
    multiples), a list of sizes, or ``None``.

    Example:
        >>> as_buckets(8), as_buckets([16, 64]), as_buckets(None)
        (SizeBuckets(multiple=8), SizeBuckets(sizes=[16, 64]), None)
    """
    if value is None or isinstance(value, SizeBuckets):
        return value
    if isinstance(value, int):
        return SizeBuckets(multiple=value)
    return SizeBuckets(sizes=value)
