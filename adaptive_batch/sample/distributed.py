"""What the sampler needs from ``torch.distributed``: replicas, and ranks kept in step.

Every rank must draw disjoint indices, run the same number of steps and use the same batch size
at each step, or DDP hangs. The sampler shards each epoch's plan (the same on every rank) into
equal parts and gathers every step's feedback so that each rank's sizing rule sees the same
numbers. Every collective it makes says what the rank is doing (a frame of the same size on every
rank, or before the ranks have agreed on that size a tagged object), so a rank that is somewhere
else -- one that skipped a feedback, finished its epoch early, runs another epoch or another
configuration -- pairs with the others' collective and every rank raises an
:class:`~adaptive_batch.AdaptiveBatchError` saying which rank is where, instead of hanging.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..contract import Feedback
from ..errors import AdaptiveBatchError
from ..probe import HostCopy
from .rank_frames import DecodedFrame, decode_frame, encode_frame

__all__ = ["RankSync", "cpu_feedback", "merge_for_sizing", "resolve_replicas"]

START, FEEDBACK, END, STATE = "start", "feedback", "end", "state"
FIX = (
    "Every rank must report feedback once for every batch it draws (wrap each rank's loader in "
    "SubsetFilter(loader, model, sampler=sampler), or call sampler.feedback(...) after every "
    "batch) and iterate the same epochs from the same checkpoint."
)


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``(num_replicas, rank)``, defaulting to the default process group (or ``(1, 0)``)."""
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized() else 1
    if rank is None:
        rank = dist.get_rank() if initialized() else 0
    if num_replicas < 1:
        raise AdaptiveBatchError(f"num_replicas must be at least 1; got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise AdaptiveBatchError(
            f"rank {rank} is outside [0, {num_replicas}) for num_replicas={num_replicas}"
        )
    if num_replicas > 1 and initialized() and dist.get_world_size() != num_replicas:
        raise AdaptiveBatchError(
            f"num_replicas={num_replicas} but the process group has {dist.get_world_size()} "
            "processes: the sampler gathers feedback over the default group, so they must match"
        )
    return num_replicas, rank


def _where(rank: int, kind: str, payload: dict[str, Any]) -> str:
    if kind == START:
        return f"rank {rank} is starting epoch {payload['epoch']} at position {payload['position']}"
    if kind == FEEDBACK:
        return f"rank {rank} is reporting feedback for a batch (its report #{payload['reports']})"
    if kind == STATE:
        return f"rank {rank} is saving a stage's state"
    return (
        f"rank {rank} has drawn the {payload['batches']} batches of epoch {payload['epoch']} and "
        f"reported feedback {payload['reports']} times during it"
    )


class RankSync:
    """The sampler's collectives, each checked for agreement.

    A step's feedback is one :mod:`~.rank_frames` frame per rank, gathered in the background
    (``async_op``) and waited for only when the next collective is due or the sampler needs it;
    every rank's feedback then waits in :attr:`arrived` until the sampler applies it
    (:meth:`take`, before its next feedback, a pass's start or a plan), so the ranks' feedback
    reaches the ledger and the sizing rule one feedback later than the rank's own would, which the
    sampler's feedback lag already allows, and at the same point whether or not a checkpoint was
    taken in between (a checkpoint saves what has arrived). An epoch's end is a frame too; a
    pass's start and a checkpoint swap a frame, then pickled details.

    Args:
        capacity: the most candidates a rank's batch holds (the frames' size); a larger one is
            swapped as an object, and so is everything before the ranks have agreed on it.
    """

    def __init__(self, num_replicas: int, rank: int, capacity: int = 0) -> None:
        self.num_replicas = num_replicas
        self.rank = rank
        self.capacity = capacity
        self.framed = False  # frames once the first start has agreed on the configuration
        self.arrived: list[list[Feedback]] = []  # per step sent: every rank's feedback
        self._pending: _InFlight | None = None

    @classmethod
    def for_sampler(
        cls, num_replicas: int, rank: int, adaptive: bool, **kwargs: Any
    ) -> RankSync | None:
        """The sampler's sync, or ``None`` on one replica (or several without a process group,
        which only a sampler whose size never changes may do)."""
        if num_replicas > 1 and adaptive and not initialized():
            raise AdaptiveBatchError(
                "an adaptive sampler on several replicas needs torch.distributed initialised: the "
                "ranks agree on batch sizes by gathering their feedback"
            )
        return cls(num_replicas, rank, **kwargs) if num_replicas > 1 and initialized() else None

    # -- pickled exchanges (a start's configuration, a checkpoint's states) ----------------------

    def exchange(self, kind: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's payload, in rank order; raises on every rank when a rank is elsewhere."""
        self.finish()
        gathered: list[Any] = [None] * self.num_replicas
        dist.all_gather_object(gathered, (kind, self.rank, payload))
        _agree([(k, r, p) for k, r, p in gathered], kind)
        ranks = [r for _, r, _ in gathered]
        if sorted(ranks) != list(range(self.num_replicas)):
            raise AdaptiveBatchError(
                f"the ranks given to the samplers are {ranks}; each of 0..{self.num_replicas - 1} "
                "must appear once"
            )
        return [p for _, _, p in gathered]

    # -- frames ----------------------------------------------------------------------------------

    def _swap(self, kind: str, counters: tuple[int, int, int]) -> list[DecodedFrame]:
        """Every rank's header, gathered now (a start, an end, a checkpoint)."""
        self.finish()
        frame = encode_frame(kind, self.rank, counters, self.capacity)
        frames = _InFlight.launch(frame, self.num_replicas).rows()
        decoded = [decode_frame(row, self.capacity, []) for row in frames]
        _agree([(d.kind, d.rank, d.where()) for d in decoded], kind)
        return decoded

    def feedback(self, feedback: Feedback, reports: int) -> None:
        """Send this rank's feedback; every rank's arrives at :meth:`finish`."""
        if not self.framed:  # before the ranks agreed on the capacity: as an object, now
            payloads = self.exchange(
                FEEDBACK, {"feedback": cpu_feedback(feedback), "reports": reports}
            )
            self.arrived.append([p["feedback"] for p in payloads])
            return
        self.finish()
        frame = encode_frame(FEEDBACK, self.rank, (reports, 0, 0), self.capacity, feedback)
        self._pending = _InFlight.launch(frame, self.num_replicas, feedback)

    def take(self) -> list[list[Feedback]]:
        """Every rank's feedback of each step sent and not taken yet (waits for it), in order."""
        self.finish()
        steps, self.arrived = self.arrived, []
        return steps

    def finish(self) -> None:
        """Wait for the feedback in flight (if any): it joins :attr:`arrived`."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        names = sorted(pending.local.stats)
        decoded = [decode_frame(row, self.capacity, names) for row in pending.rows()]
        _agree([(d.kind, d.rank, d.where()) for d in decoded], FEEDBACK)
        key = decoded[self.rank].stats_key
        if all(d.fits and d.stats_key == key for d in decoded):
            items = [_feedback_of(d) for d in decoded]
        else:  # every rank sees the same frames, so every rank swaps objects here
            gathered: list[Any] = [None] * self.num_replicas
            dist.all_gather_object(gathered, cpu_feedback(pending.local))
            items = gathered
        self.arrived.append(items)

    # -- the sampler's checkpoints ---------------------------------------------------------------

    def start(
        self, config: dict[str, Any] | None, epoch: int, position: int, reporting: bool, plan: str
    ) -> None:
        """A pass starts: every rank must be configured alike, at the same epoch and position,
        with the same epoch plan (``plan`` is its digest)."""
        if self.framed:  # a rank elsewhere is caught by the frames, before any pickling
            self._swap(START, (epoch, position, 0))
        payload = {
            "config": config,
            "epoch": epoch,
            "position": position,
            "reporting": reporting,
            "plan": plan,
        }
        _check_start(self.exchange(START, payload), epoch)
        self.framed = self.capacity > 0

    def end(self, epoch: int, batches: int, reports: int) -> None:
        if self.framed:
            self._swap(END, (epoch, batches, reports))
        else:
            self.exchange(END, {"epoch": epoch, "batches": batches, "reports": reports})

    def states(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        if self.framed:
            self._swap(STATE, (0, 0, 0))
        return [p["state"] for p in self.exchange(STATE, {"state": state})]


class _InFlight:
    """One gather of frames, started in the background; :meth:`rows` waits for it."""

    def __init__(self, work: Any, gathered: list[Tensor], local: Feedback | None) -> None:
        self.work, self.gathered, self.local = work, gathered, local
        self.host: HostCopy | None = None

    @classmethod
    def launch(cls, frame: Tensor, world: int, local: Feedback | None = None) -> _InFlight:
        device = _collective_device()
        if device.type != "cpu":
            frame = frame.pin_memory().to(device, non_blocking=True)
        gathered = [torch.empty_like(frame) for _ in range(world)]
        pending = cls(dist.all_gather(gathered, frame, async_op=True), gathered, local)
        if device.type != "cpu":
            # On an accelerator the wait only orders the streams: copy the result back now, so
            # that reading it a step later waits for this gather, not for the step since.
            pending.work.wait()
            pending.host = HostCopy(torch.stack(gathered), torch.float64)
        return pending

    def rows(self) -> np.ndarray:
        if self.host is not None:
            return self.host.result().numpy()
        self.work.wait()
        return torch.stack(self.gathered).numpy()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(gathered: list[tuple[str, int, dict[str, Any]]], kind: str) -> None:
    """Raise on every rank when some rank is doing something other than ``kind``."""
    if any(k != kind for k, _, _ in gathered):
        where = "; ".join(_where(r, k, p) for k, r, p in gathered)
        raise AdaptiveBatchError(f"the ranks' samplers are out of step: {where}. {FIX}")


def _check_start(payloads: list[dict[str, Any]], epoch: int) -> None:
    first = payloads[0]
    for rank, other in enumerate(payloads):
        if first["config"] is not None:
            differing = sorted(
                k for k in first["config"] if other["config"].get(k) != first["config"][k]
            )
            if differing:
                details = ", ".join(
                    f"{k}: rank 0 {first['config'][k]!r}, rank {rank} {other['config'][k]!r}"
                    for k in differing
                )
                raise AdaptiveBatchError(
                    f"the samplers on different ranks are configured differently ({details})"
                )
        if (other["epoch"], other["position"]) != (first["epoch"], first["position"]):
            raise AdaptiveBatchError(
                f"the ranks' samplers are out of step: {_where(0, START, first)}; "
                f"{_where(rank, START, other)}. {FIX}"
            )
        if other["plan"] != first["plan"]:
            raise AdaptiveBatchError(
                f"rank {rank} planned epoch {epoch} differently from rank 0: the ranks' score "
                "tables differ (every rank must report the feedback of every batch, and "
                "resume from the same checkpoint)"
            )
        if other["reporting"] != first["reporting"]:
            without = ", ".join(str(r) for r, p in enumerate(payloads) if not p["reporting"])
            raise AdaptiveBatchError(
                f"rank {without}: no stage reports feedback to its sampler (no SubsetFilter or "
                "PerLayerBackward was given sampler=), while the other ranks' do, so it would "
                f"never join their feedback exchange. {FIX}"
            )


def _feedback_of(frame: DecodedFrame) -> Feedback:
    losses = None if frame.losses is None else torch.from_numpy(frame.losses)
    return Feedback(
        kept=torch.from_numpy(frame.kept),
        dropped=torch.from_numpy(frame.dropped),
        reason=frame.reason,
        stats=frame.stats or {},
        losses=losses,
    )


def merge_for_sizing(items: list[Feedback]) -> Feedback:
    """The feedback every rank's sizing rule sees: rank 0's batch and reason, each statistic
    averaged over the ranks where it is finite (rank 0's value where it is finite nowhere)."""
    first = items[0]
    if len(items) == 1:
        return first
    stats: dict[str, float] = {}
    for key, value in first.stats.items():
        finite = [f.stats[key] for f in items if key in f.stats and math.isfinite(f.stats[key])]
        stats[key] = sum(finite) / len(finite) if finite else value
    return Feedback(kept=first.kept, dropped=first.dropped, reason=first.reason, stats=stats)


def cpu_feedback(feedback: Feedback) -> Feedback:
    """A copy with CPU tensors and plain floats, cheap to pickle for a gather."""
    losses = feedback.losses
    return Feedback(
        kept=feedback.kept.to("cpu", torch.long).flatten(),
        dropped=feedback.dropped.to("cpu", torch.long).flatten(),
        reason=feedback.reason,
        stats={k: float(v) for k, v in feedback.stats.items()},
        losses=None if losses is None else losses.detach().to("cpu", torch.float32),
    )
