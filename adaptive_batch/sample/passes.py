"""SamplerPass: one pass over an epoch, the iterator that ``iter(sampler)`` returns."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..contract import require_keys

if TYPE_CHECKING:
    from .sampler import AdaptiveBatchSampler

__all__ = ["SamplerPass"]


class SamplerPass(Iterator[list[int]]):
    """Hands out one epoch's indices from ``position`` on: whole batches sized as they are
    handed out, or chunks for the consumer to assemble.

    Each ``iter(sampler)`` makes its own pass, as torch's samplers do: a second iterator over the
    same loader (a peek at one batch, a second filter) never moves this one. Its state (epoch and
    position) is what ``StatefulDataLoader`` saves for the iterator it holds.

    A state can hand back the last whole batches handed out that still await feedback (a loader
    or a trainer fetched them ahead of training): its position steps back over them and
    ``replay`` lists their sizes, so a resumed pass hands the same batches out again, at the same
    sizes, before it decides new ones.
    """

    EPOCH_KEY = "epoch"
    POSITION_KEY = "position"
    REPLAY_KEY = "replay"

    def __init__(
        self,
        sampler: AdaptiveBatchSampler,
        epoch: int,
        position: int = 0,
        replay: Sequence[int] = (),
        *,
        resumes: SamplerPass | None = None,
    ) -> None:
        self.sampler = sampler
        self.resumes = resumes  # the loaded pass this one continues
        self._seek(epoch, position, replay)

    def _seek(self, epoch: int, position: int, replay: Sequence[int] = ()) -> None:
        self.epoch = epoch
        self.indices = self.sampler.order.epoch_indices(epoch)
        self.start = self.position = min(position, self.indices.size)
        self.batches = 0  # handed out by this pass
        self.sizes: list[int] = []  # of the whole batches this pass handed out, in order
        self.replay = [int(size) for size in replay]  # sizes to hand out again first
        self.started = self.finished = False
        self.reports_at_start = 0
        self.last_chunk: np.ndarray | None = None  # with a chunk_size: the latest chunk handed out

    @property
    def total(self) -> int:
        """Indices this pass hands out from where it started."""
        return self.indices.size - self.start

    @property
    def remaining(self) -> int:
        """Indices this pass has yet to hand out."""
        return self.indices.size - self.position

    def __iter__(self) -> SamplerPass:
        return self

    def __next__(self) -> list[int]:
        sampler = self.sampler
        if not self.started:
            self.started = True
            sampler.pass_started(self)
        remaining = self.remaining
        chunk_size = sampler.chunk_size
        size = min(chunk_size, remaining) if chunk_size else 0
        if remaining > 0 and not chunk_size:
            if self.replay:  # decided before the checkpoint; handed out again as it was
                size = min(self.replay.pop(0), remaining)
            else:
                size = sampler.sizer.decide(remaining, sampler._table.num_feedback)
            if size == remaining < sampler.min_batch_size and sampler.drop_last:
                sampler.tail_dropped()
                self.position, remaining = self.indices.size, 0
        if remaining <= 0:
            self._finish()
            raise StopIteration
        batch = self.indices[self.position : self.position + size]
        self.position += size
        self.batches += 1
        if not chunk_size:
            self.sizes.append(size)
        sampler.handed_out(self, batch, self.total if chunk_size else None)
        if self.position >= self.indices.size:
            self._finish()  # the epoch is over once its last batch is out, asked for again or not
        return batch.tolist()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.sampler.pass_finished(self)

    def state_dict(self, unsettled: int | None = None) -> dict[str, Any]:
        """Epoch and position; ``unsettled``: how many of the last whole batches handed out
        await feedback, to hand back (see the class). ``None``: a loader asks (a
        ``StatefulDataLoader`` snapshots its sampler's iterator), not the sampler."""
        if unsettled is None:
            self.sampler.pass_snapshot(self)
            unsettled = 0
        back = self.sizes[len(self.sizes) - unsettled :] if 0 < unsettled <= len(self.sizes) else []
        state: dict[str, Any] = {
            self.EPOCH_KEY: self.epoch,
            self.POSITION_KEY: self.position - sum(back),
        }
        if back or self.replay:
            state[self.REPLAY_KEY] = back + self.replay
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        require_keys(self, state, (self.EPOCH_KEY, self.POSITION_KEY))
        self._seek(state[self.EPOCH_KEY], state[self.POSITION_KEY], state.get(self.REPLAY_KEY, ()))
        self.sampler.pass_loaded(self)
