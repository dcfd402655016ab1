"""TrajectoryLogger: what the sampler did, batch by batch, to CSV and TensorBoard."""

from __future__ import annotations

import contextlib
import csv
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..contract import Feedback
from ..errors import AdaptiveBatchError
from ..optional import require

__all__ = ["TrajectoryLogger"]

#: The columns every row has, in order; the policy's own numbers follow (``feedback.stats``).
COLUMNS = (
    "step",
    "epoch",
    "candidates",
    "kept",
    "kept_fraction",
    "next_batch_size",
    "requested_batch_size",
    "candidates_total",
    "kept_total",
    "lr",
    "reason",
)
TAG_PREFIX = "adaptive_batch/"


class TrajectoryLogger:
    """Records each batch's feedback as the sampler sees it; the training loop is unchanged.

    It attaches itself to the sampler (:meth:`AdaptiveBatchSampler.add_listener`) and writes,
    every ``every`` batches, one row: the step (feedback count), epoch, candidates and kept
    samples of that batch, the kept fraction, the size the sampler picked next (and the sizing
    rule's request before the caps), running totals of candidates and kept samples (over all
    ranks), the learning rate of ``optimizer``'s first parameter group, the selection's reason,
    the gradient-noise estimates where the sizing rule keeps them, and every number the stage
    and the policy reported (``loss``; ``grad_sq_norm`` and ``grad_variance`` when a sizing rule
    has a stage compute them, or with ``statistics=True``; a selection rule's own statistics). Rows go to ``csv_path`` (a column appears when its number first does) and as
    scalars tagged ``adaptive_batch/<column>`` to a TensorBoard ``SummaryWriter`` in
    ``tensorboard_dir`` (``pip install "adaptive-batch[tensorboard]"``); reasons are logged as
    running counts, ``adaptive_batch/reason/<reason>``.

    The step is the sampler's feedback count, which a checkpoint restores, so a resumed run
    appends to the same file and curves continue where they stopped. Under DDP only rank 0
    writes unless ``all_ranks``. Nothing here synchronises with the device: feedback holds plain
    numbers by the time the sampler records it.

    Example:
        >>> import tempfile, torch
        >>> from adaptive_batch import AdaptiveBatchSampler, Feedback
        >>> sampler = AdaptiveBatchSampler(8, batch_size=4, min_batch_size=4, seed=0)
        >>> folder = tempfile.mkdtemp()
        >>> log = TrajectoryLogger(sampler, csv_path=f"{folder}/run.csv")
        >>> for batch in sampler:
        ...     sampler.feedback(Feedback(torch.tensor(batch), torch.tensor([], dtype=torch.long)))
        >>> log.close()
        >>> open(f"{folder}/run.csv").read().splitlines()[1]
        '1,0,4,4,1.0,4,4.0,4,4,,keep_all'
    """

    def __init__(
        self,
        sampler: Any,
        *,
        csv_path: str | Path | None = None,
        tensorboard_dir: str | Path | None = None,
        optimizer: Any = None,
        every: int = 1,
        all_ranks: bool = False,
        statistics: bool = False,
    ) -> None:
        if csv_path is None and tensorboard_dir is None:
            raise AdaptiveBatchError("give the logger a csv_path, a tensorboard_dir, or both")
        if every < 1:
            raise AdaptiveBatchError(f"every must be at least 1; got {every}")
        self.sampler, self.optimizer, self.every = sampler, optimizer, every
        # read by the sampler: head-gradient statistics cost a closed form per step, so they are
        # logged when a sizing rule needs them anyway, or when asked for
        self.wants_gradient_statistics = statistics
        self.rows_written = 0
        self.reasons: Counter[str] = Counter()
        self._table = None
        self._writer = None
        if all_ranks or getattr(sampler, "rank", 0) == 0:
            if csv_path is not None:
                self._table = _CsvTable(Path(csv_path))
            if tensorboard_dir is not None:
                tensorboard = require(
                    "torch.utils.tensorboard",
                    "tensorboard",
                    "TrajectoryLogger's TensorBoard output",
                )
                self._writer = tensorboard.SummaryWriter(log_dir=str(tensorboard_dir))
        sampler.add_listener(self)

    def __call__(self, sampler: Any, feedback: Feedback) -> None:
        self.reasons[feedback.reason] += 1
        if sampler.num_feedback % self.every or (self._table is None and self._writer is None):
            return
        row = self.row(sampler, feedback)
        step = int(row["step"])
        if self._table is not None:
            self._table.append(row)
        if self._writer is not None:
            for name, value in row.items():
                if isinstance(value, (int, float)) and name != "step":
                    self._writer.add_scalar(TAG_PREFIX + name, value, step)
            for reason, count in self.reasons.items():
                self._writer.add_scalar(f"{TAG_PREFIX}reason/{reason}", count, step)
        self.rows_written += 1

    def row(self, sampler: Any, feedback: Feedback) -> dict[str, Any]:
        """The row this feedback makes (what :meth:`__call__` writes)."""
        candidates = feedback.batch_size
        row: dict[str, Any] = {
            "step": sampler.num_feedback,
            "epoch": sampler.epoch,
            "candidates": candidates,
            "kept": feedback.num_kept,
            "kept_fraction": feedback.num_kept / candidates if candidates else math.nan,
            "next_batch_size": sampler.batch_size,
            "requested_batch_size": sampler.requested_batch_size,
            "candidates_total": sampler.num_candidates,
            "kept_total": sampler.num_kept,  # counters: nothing per step sums over the dataset
            "lr": self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None,
            "reason": str(feedback.reason),
        }
        noise = sampler.gradient_noise
        if noise is not None:
            row["noise_variance"], row["noise_sq_norm"] = noise.variance, noise.sq_norm
            row["noise_scale"] = noise.variance / noise.sq_norm if noise.sq_norm > 0 else math.inf
        for name, value in feedback.stats.items():
            row.setdefault(name, float(value))
        return row

    def flush(self) -> None:
        if self._table is not None:
            self._table.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Stop listening and close the files (a closed logger ignores later feedback)."""
        with contextlib.suppress(ValueError):  # closed already
            self.sampler.remove_listener(self)
        if self._table is not None:
            self._table.close()
        if self._writer is not None:
            self._writer.close()
        self._table = self._writer = None

    def __enter__(self) -> TrajectoryLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _CsvTable:
    """A CSV file whose columns grow: a new column rewrites the file once with the wider header
    (rare: the policy's numbers appear in the first rows); otherwise rows are appended. An
    existing file is continued (a resumed run)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] = list(COLUMNS)
        if path.exists() and path.stat().st_size:
            with path.open(newline="") as existing:
                header = next(csv.reader(existing), [])
            self.columns += [c for c in header if c not in self.columns]
            if header != self.columns:
                self._rewrite()
        else:
            path.write_text(",".join(self.columns) + "\n")
        self.file = path.open("a", newline="")

    def append(self, row: Mapping[str, Any]) -> None:
        new = [name for name in row if name not in self.columns]
        if new:
            self.file.close()
            self.columns += new
            self._rewrite()
            self.file = self.path.open("a", newline="")
        values = [row.get(name) for name in self.columns]
        csv.writer(self.file).writerow(["" if v is None else v for v in values])
        self.file.flush()

    def _rewrite(self) -> None:
        with self.path.open(newline="") as existing:
            rows = list(csv.DictReader(existing))
        with self.path.open("w", newline="") as file:
            writer = csv.DictWriter(file, self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
