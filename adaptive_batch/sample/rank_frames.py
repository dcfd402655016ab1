"""RankFrame: one rank's message to the others, as one fixed-size ``float64`` tensor.

Under DDP every rank must see every rank's feedback each step. Pickling it for
``all_gather_object`` costs two collectives and a host round trip per step; a frame is one tensor
whose size is fixed for the whole run (the sampler's largest batch), so the ranks swap it with one
``all_gather`` that can run in the background while the next step trains. Layout::

    [ header (HEADER numbers) | dataset indices (capacity) | losses (capacity) | stats (STATS) ]

The header says what the rank is doing (its :data:`KINDS` code and two counters), so a rank that
is somewhere else is caught from the frames alone. Indices are exact in ``float64`` up to 2**53.
A feedback that does not fit (more candidates than the capacity, more than :data:`STATS`
statistics, statistic names that differ between ranks, a reason outside ``Reason.ALL``) is marked in its header; the ranks then
swap that step's feedback as objects instead (all ranks see the mark, so all do).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..contract import Feedback, Reason

__all__ = ["HEADER", "KINDS", "STATS", "DecodedFrame", "decode_frame", "encode_frame", "stats_key"]

KINDS = {"start": 1.0, "feedback": 2.0, "end": 3.0, "state": 4.0}
_KIND_NAMES = {code: name for name, code in KINDS.items()}
# header slots
(
    _KIND,
    _RANK,
    _C0,
    _C1,
    _C2,
    _KEPT,
    _DROPPED,
    _REASON,
    _HAS_LOSSES,
    _STATS_KEY,
    _NUM_STATS,
    _FITS,
) = range(12)
HEADER = 12
STATS = 16


def stats_key(names: list[str]) -> float:
    """A number naming this set of statistic names, the same in every process (not ``hash``)."""
    return float(zlib.crc32("\x1f".join(names).encode()))


def frame_size(capacity: int) -> int:
    return HEADER + 2 * capacity + STATS


def encode_frame(
    kind: str,
    rank: int,
    counters: tuple[int, int, int],
    capacity: int,
    feedback: Feedback | None = None,
) -> Tensor:
    """The frame of one rank: ``kind``, three counters that say where the rank is (see
    :meth:`DecodedFrame.where`), and a feedback's indices, losses and statistics when given."""
    frame = torch.full((frame_size(capacity),), math.nan, dtype=torch.float64)
    header = frame.numpy()  # a view of the whole frame: filling it fills the frame
    header[_KIND], header[_RANK] = KINDS[kind], rank
    header[_C0 : _C2 + 1] = counters
    if feedback is None:
        return frame
    kept, dropped = feedback.kept.reshape(-1), feedback.dropped.reshape(-1)
    names = sorted(feedback.stats)
    count = kept.numel() + dropped.numel()
    header[_KEPT], header[_DROPPED] = kept.numel(), dropped.numel()
    header[_STATS_KEY], header[_NUM_STATS] = stats_key(names), len(names)
    header[_HAS_LOSSES] = feedback.losses is not None
    known = feedback.reason in Reason.ALL
    header[_REASON] = Reason.ALL.index(feedback.reason) if known else -1
    header[_FITS] = known and count <= capacity and len(names) <= STATS
    if not header[_FITS]:
        return frame
    start = HEADER
    frame[start : start + kept.numel()] = kept.to("cpu", torch.float64)
    frame[start + kept.numel() : start + count] = dropped.to("cpu", torch.float64)
    if feedback.losses is not None:
        start += capacity
        frame[start : start + count] = feedback.losses.detach().reshape(-1).to("cpu", torch.float64)
    start = HEADER + 2 * capacity
    header[start : start + len(names)] = [float(feedback.stats[k]) for k in names]
    return frame


@dataclass(frozen=True)
class DecodedFrame:
    """What one rank's frame says: its kind, rank and counters, and (a feedback that fitted) the
    arrays the ledger records and the statistics, named by ``names``."""

    kind: str
    rank: int
    counters: tuple[int, int, int]
    fits: bool
    stats_key: float
    reason: str = Reason.KEEP_ALL
    kept: np.ndarray | None = None
    dropped: np.ndarray | None = None
    losses: np.ndarray | None = None
    stats: dict[str, float] | None = None

    def where(self) -> dict[str, Any]:
        """Where the rank is, as the sampler's out-of-step messages name it: a start's epoch and
        position, a feedback's report number, an end's epoch, batches and reports."""
        first, second, third = self.counters
        if self.kind == "start":
            return {"epoch": first, "position": second}
        if self.kind == "end":
            return {"epoch": first, "batches": second, "reports": third}
        return {"reports": first}


def decode_frame(frame: np.ndarray, capacity: int, names: list[str]) -> DecodedFrame:
    """Read a frame (a row of the gathered ``float64`` array); ``names`` are this rank's sorted
    statistic names, which a fitting feedback with the same :func:`stats_key` shares."""
    kind = _KIND_NAMES.get(float(frame[_KIND]), "unknown")
    counters = (int(frame[_C0]), int(frame[_C1]), int(frame[_C2]))
    rank = int(frame[_RANK])
    if kind != "feedback" or frame[_FITS] != 1.0:
        key = float(frame[_STATS_KEY])
        return DecodedFrame(kind, rank, counters, fits=kind != "feedback", stats_key=key)
    num_kept, count = int(frame[_KEPT]), int(frame[_KEPT] + frame[_DROPPED])
    indices = frame[HEADER : HEADER + count].astype(np.int64)
    losses = None
    if frame[_HAS_LOSSES] == 1.0:
        losses = frame[HEADER + capacity : HEADER + capacity + count].astype(np.float32)
    start = HEADER + 2 * capacity
    values = frame[start : start + int(frame[_NUM_STATS])]
    return DecodedFrame(
        kind,
        rank,
        counters,
        fits=True,
        stats_key=float(frame[_STATS_KEY]),
        reason=Reason.ALL[int(frame[_REASON])],
        kept=indices[:num_kept],
        dropped=indices[num_kept:],
        losses=losses,
        # names of another set (the caller compares stats_key) name nothing here
        stats=dict(zip(names, values.tolist(), strict=True)) if len(names) == len(values) else None,
    )
