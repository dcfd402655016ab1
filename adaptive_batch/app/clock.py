"""Training time for the runs: wall seconds (synchronising CUDA first) and the process's CPU
seconds, with evaluation left out."""

from __future__ import annotations

import time

import torch

__all__ = ["Clock"]


class Clock:
    """Training time, excluding evaluation: wall seconds (synchronising CUDA before reading) and
    the process's CPU seconds over all its threads (unaffected by other work on the machine)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total = 0.0
        self.cpu_total = 0.0
        self._start: float | None = None
        self._cpu_start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def stop(self) -> float:
        self._sync()
        assert self._start is not None
        self.total += time.perf_counter() - self._start
        self.cpu_total += time.process_time() - self._cpu_start
        self._start = None
        return self.total

    def elapsed(self) -> float:
        """Training time so far, without synchronising."""
        running = 0.0 if self._start is None else time.perf_counter() - self._start
        return self.total + running
