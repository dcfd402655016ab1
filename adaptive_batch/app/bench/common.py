"""What every benchmark part shares: the device, a resumable results file, and table formatting."""

from __future__ import annotations

import contextlib
import csv
import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Results",
    "describe_machine",
    "markdown_table",
    "mean_std",
    "peak_memory_bytes",
    "pick_device",
    "reached_cell",
    "synchronize",
]


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what native code writes to the process's stderr (file descriptor 2) meanwhile:
    torch's profiler logs its start and stop there, and on a CUDA build without a GPU an
    ``ERROR ... gpuGetDeviceCount failed`` line that is not an error of the benchmark."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated by ``fn`` beyond what was allocated before it (what it returns
    included): CUDA's allocator statistics on a GPU; on the CPU, the allocation and free events
    that ``torch.profiler`` records, replayed in order."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():  # the profiler's own start/stop log lines (not fn's output)
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_native_stderr():
            prof.__exit__(None, None, None)
            events = prof.events()
    current = peak = 0
    for event in sorted(events, key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return float(peak)


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)"
    return f"{where}, torch {torch.__version__.split('+')[0]}"


def _cell(value: Any) -> str:
    """How a value is stored in a results CSV, and so how lookups must spell it."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class Results:
    """Rows of one benchmark part in ``<out>/<part>.csv``: appended as runs finish, so a later
    call skips what is there and an interrupted part resumes."""

    def __init__(
        self, out_dir: str | Path, part: str, fields: Sequence[str], key: Sequence[str]
    ) -> None:
        self.path = Path(out_dir) / f"{part}.csv"
        self.fields = list(fields)
        self.key = list(key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != self.fields:
                    raise ValueError(
                        f"{self.path} has columns {reader.fieldnames}, expected {self.fields}"
                    )
                self.rows = list(reader)
        else:
            self.rows = []

    def _key_of(self, row: dict[str, Any]) -> tuple[str, ...]:
        return tuple(_cell(row[k]) for k in self.key)

    def has(self, **key: Any) -> bool:
        wanted = self._key_of(key)
        return any(self._key_of(r) == wanted for r in self.rows)

    def add(self, row: dict[str, Any]) -> None:
        row = {k: _cell(v) for k, v in row.items()}
        if set(row) != set(self.fields):
            raise ValueError(f"row fields {sorted(row)} differ from {sorted(self.fields)}")
        new_file = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        self.rows.append(row)

    def select(self, **match: Any) -> list[dict[str, str]]:
        return [r for r in self.rows if all(r[k] == _cell(v) for k, v in match.items())]


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± sample std"`` (``± 0`` for one value)."""
    if not values:
        return "—"
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def floats(
    rows: Sequence[dict[str, str]], field: str, keep: Callable[[float], bool] = lambda v: True
) -> list[float]:
    return [v for v in (float(r[field]) for r in rows) if keep(v)]


def reached_cell(values: Sequence[float | None]) -> str:
    """Mean ± std of the runs that reached a target (``None``: a run that never did), and how
    many did.

    Example:
        >>> reached_cell([0.5, None, 0.7])
        '0.60 ± 0.14 (2/3)'
        >>> reached_cell([None])
        'never (0/1)'
    """
    hits = [v for v in values if v is not None]
    if not hits:
        return f"never (0/{len(values)})"
    return f"{mean_std(hits)} ({len(hits)}/{len(values)})"
