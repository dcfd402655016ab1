"""What the sampler needs from ``torch.distributed``: replicas, agreement, and shared feedback.

Every rank must draw disjoint indices, run the same number of steps and use the same batch size
at each step, or DDP hangs. The sampler shards each epoch's permutation (the same on every rank)
into equal parts, checks once that every rank is configured alike, and gathers each step's
feedback from all ranks so that every rank runs its sizing rule on the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .feedback import Feedback

__all__ = ["check_same_config", "gather", "merge_for_sizing", "resolve_replicas"]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``(num_replicas, rank)``, defaulting to the default process group (or ``(1, 0)``)."""
    if num_replicas is None:
        num_replicas = dist.get_world_size() if _initialized() else 1
    if rank is None:
        rank = dist.get_rank() if _initialized() else 0
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1; got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(
            f"rank {rank} is outside [0, {num_replicas}) for num_replicas={num_replicas}"
        )
    if num_replicas > 1 and _initialized() and dist.get_world_size() != num_replicas:
        raise ValueError(
            f"num_replicas={num_replicas} but the process group has {dist.get_world_size()} "
            "processes: the sampler gathers feedback over the default group, so they must match"
        )
    return num_replicas, rank


def gather(obj: Any) -> list[Any]:
    """``obj`` from every rank of the default group, in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_same_config(config: dict[str, Any], rank: int) -> None:
    """Raise on every rank (never hang) when the ranks' sampler configurations differ."""
    configs = gather({**config, "rank": rank})
    ranks = [c.pop("rank") for c in configs]
    if sorted(ranks) != list(range(len(configs))):
        raise ValueError(
            f"the ranks given to the samplers are {ranks}; each of 0..{len(configs) - 1} must appear once"
        )
    for r, other in enumerate(configs):
        differing = sorted(k for k in configs[0] if other.get(k) != configs[0][k])
        if differing:
            details = ", ".join(
                f"{k}: rank 0 {configs[0][k]!r}, rank {r} {other[k]!r}" for k in differing
            )
            raise ValueError(
                f"the samplers on different ranks are configured differently ({details})"
            )


def merge_for_sizing(items: list[Feedback]) -> Feedback:
    """The feedback every rank's sizing rule sees: rank 0's batch and reason, each statistic
    averaged over the ranks where it is finite (rank 0's value where it is finite nowhere)."""
    first = items[0]
    stats: dict[str, float] = {}
    for key, value in first.stats.items():
        finite = [f.stats[key] for f in items if key in f.stats and math.isfinite(f.stats[key])]
        stats[key] = sum(finite) / len(finite) if finite else value
    return Feedback(kept=first.kept, dropped=first.dropped, reason=first.reason, stats=stats)


def cpu_feedback(feedback: Feedback) -> Feedback:
    """A copy with CPU tensors and plain floats, cheap to pickle for a gather."""
    return Feedback(
        kept=feedback.kept.to("cpu", torch.long),
        dropped=feedback.dropped.to("cpu", torch.long),
        reason=feedback.reason,
        stats={k: float(v) for k, v in feedback.stats.items()},
    )
